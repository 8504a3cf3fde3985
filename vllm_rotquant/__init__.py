"""vllm-rotquant: W4A4 INT4 with rotations for vLLM.

`register()` is the `vllm.general_plugins` entry point; it is idempotent and imports vLLM only
when called, so the offline calibrator can use this package without vLLM installed.
"""
__version__ = "0.1.0"


def register() -> None:
    """Register the `rotquant` quantization method with vLLM (called in every vLLM process).
    An unsupported vLLM is refused here, with the supported range (vllm_rotquant.compat)."""
    from vllm_rotquant import compat

    compat.check_vllm()
    from vllm_rotquant import config  # noqa: F401  (decorated with @register_quantization_config)

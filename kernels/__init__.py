"""Kernels of rotquant: torch custom ops with exact references (CPU) and Triton (CUDA)."""
from vllm_rotquant.kernels import ops  # noqa: F401  (registers torch.ops.rotquant.*)

try:  # CUDA implementations; absent on CPU-only installs
    import torch

    if torch.cuda.is_available():
        from vllm_rotquant.kernels import triton_ops  # noqa: F401
except ImportError:  # Triton missing or no triton_ops module yet: the reference serves
    pass

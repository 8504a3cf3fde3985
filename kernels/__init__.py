"""Kernels of rotquant: the reference ops (ops.py, `torch.ops.rotquant.*`), the fast kernels
(cpu_kernel.py, triton_kernel.py) and the choice between them at load (linear_kernel.py)."""
from vllm_rotquant.kernels import ops  # noqa: F401  (registers the reference ops)

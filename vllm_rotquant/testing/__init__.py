"""Helpers shared by the tests and the benchmarks (importable, so neither edits sys.path).

- `ckpt_factory`: tiny and model-shaped random rotquant checkpoints, config-edited twins, and the
  offline simulation's logprobs of a checkpoint (`reference_logprobs`).
- `hf_factory`: tiny random Hugging Face source models (Llama, Qwen2, Mistral, Qwen3).
- `real_model`: SmolLM2-135M and a cached W4A4 checkpoint of it.
- `vllm_server`: start/stop a real vLLM OpenAI server and clean up its shared memory.
- `processes`: run a vLLM engine in its own process group and end it reliably.

Nothing here imports `vllm_rotquant.offline` or vLLM at import time (only inside the functions
that need them), so the plugin's import rules hold and the helpers import without either.
"""

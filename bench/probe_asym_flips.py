"""Where the CUDA simulation of a tiny checkpoint leaves the CPU reference (issue 22's a4-asym
engine case): per quantized linear, how far its float inputs differ between the two devices, how
many of their INT4 codes and zero points differ when both are quantized by the CPU reference, and
whether the CUDA quantizer agrees with the reference on the CUDA inputs (in-situ exactness).

    python bench/probe_asym_flips.py            # on a machine with CUDA
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from vllm_rotquant.format import RotQuantSpec
from vllm_rotquant.kernels import reference as ref
from vllm_rotquant.kernels import triton_ops
from vllm_rotquant.offline.simulate import SimQuantLinear, load_simulated
from vllm_rotquant.testing.ckpt_factory import build_tiny_checkpoint


def capture(ckpt, ids, device):
    model = load_simulated(ckpt, torch.float32).to(device)
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, SimQuantLinear):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: seen.__setitem__(n, (mod, a[0].detach()))))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return seen


def quant(mod, x):
    x = x.reshape(-1, x.shape[-1]).float()
    if mod.hadamard_block:
        x = ref.hadamard_ref(x, mod.hadamard_block)
    if mod.act_symmetric:
        q, s = ref.quant_act_ref(x, mod.clip, mod.act_bits)
        return q, s, torch.zeros_like(s, dtype=torch.int32)
    return ref.quant_act_asym_ref(x, mod.clip, mod.act_bits)


def main():
    ids = torch.randint(3, 384, (160,), generator=torch.Generator().manual_seed(7)).tolist()
    for sym in (True, False):
        spec = RotQuantSpec(down_proj_block=128, qk_block=32, tp_sizes=(1, 2), act_clip_ratio=0.9, act_symmetric=sym)
        ckpt = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "c", spec=spec, seed=1)
        cpu, gpu = capture(ckpt, ids, "cpu"), capture(ckpt, ids, "cuda")
        print(f"\n{'symmetric' if sym else 'asymmetric'} A4 | linear | max |dx|/max|x| | tokens with a code flip "
              "| codes flipped | zero points flipped | CUDA quantizer vs reference on CUDA inputs")
        for name, (mod, xc) in cpu.items():
            xg = gpu[name][1].cpu()
            rel = ((xg - xc).abs().max() / xc.abs().max()).item()
            qc, _, zc = quant(mod, xc)
            qg, _, zg = quant(mod, xg)
            flip = (qc != qg)
            x2 = gpu[name][1].reshape(-1, xc.shape[-1])
            if mod.hadamard_block:
                got = (triton_ops.hadamard_quant(x2, mod.hadamard_block, mod.clip, mod.act_bits) if sym else
                       triton_ops.hadamard_quant_asym(x2, mod.hadamard_block, mod.clip, mod.act_bits))
            else:
                got = (triton_ops.quant_act(x2, mod.clip, mod.act_bits) if sym else
                       triton_ops.quant_act_asym(x2, mod.clip, mod.act_bits))
            exact = torch.equal(got[0].cpu(), qg) and (sym or torch.equal(got[2].cpu(), zg))
            print(f"| {name} | {rel:.1e} | {int(flip.any(-1).sum())}/{flip.shape[0]} | {int(flip.sum())} | "
                  f"{int((zc != zg).sum())} | {'exact' if exact else 'DIFFERS'} |")


if __name__ == "__main__":
    main()

"""Measured GEMM tile tables (kernels/tuned_tiles.py): parsing, bucket lookup, bad tables named,
the shipped tables well formed, and pick_config taking a table's tile (the tile's exactness under
the interpreter, on the GPU in tests/gpu/test_triton_gemm.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_rotquant.kernels import tuned_tiles

CFG = dict(BM=16, BN=64, BKP=128, num_warps=4, num_stages=4, SPLIT_K=2, GROUP_M=8)


def _table(entries):
    return {"device": "test", "gemm": entries}


def test_lookup_takes_the_smallest_bucket_at_or_above_m():
    c1, c16 = dict(CFG, BN=32), dict(CFG, BN=128)
    t = tuned_tiles.parse_table(_table([dict(m=16, n=4096, k=4096, cfg=c16), dict(m=1, n=4096, k=4096, cfg=c1)]), "t")
    assert tuned_tiles.lookup(t, 1, 4096, 4096) == c1
    assert tuned_tiles.lookup(t, 2, 4096, 4096) == c16
    assert tuned_tiles.lookup(t, 16, 4096, 4096) == c16
    assert tuned_tiles.lookup(t, 17, 4096, 4096) is None  # past the buckets: the heuristic
    assert tuned_tiles.lookup(t, 1, 4096, 11008) is None  # another shape
    got = tuned_tiles.lookup(t, 1, 4096, 4096)
    got["BN"] = 7  # a copy: the table is not mutated by callers
    assert tuned_tiles.lookup(t, 1, 4096, 4096) == c1


@pytest.mark.parametrize("entry,needle", [
    (dict(m=1, n=64, k=64, cfg=dict(CFG, BN=48)), "cfg['BN'] must be a positive power of two"),
    (dict(m=1, n=64, k=64, cfg=dict(CFG, BM=8)), "must be >= 16"),
    (dict(m=1, n=64, k=64, cfg={k: v for k, v in CFG.items() if k != "SPLIT_K"}), "exactly the keys"),
    (dict(m=1, n=64, k=64, cfg=dict(CFG, num_stages=0)), "num_stages"),
    (dict(m=0, n=64, k=64, cfg=CFG), "positive integers"),
    (dict(n=64, k=64, cfg=CFG), "positive integers"),
])
def test_bad_entries_are_named(entry, needle):
    with pytest.raises(ValueError, match=r"tbl\.json: gemm\[1\]") as e:
        tuned_tiles.parse_table(_table([dict(m=1, n=8, k=8, cfg=CFG), entry]), "tbl.json")
    assert needle in str(e.value)


def test_duplicate_bucket_and_bad_file(tmp_path):
    with pytest.raises(ValueError, match="a second entry for m=1"):
        tuned_tiles.parse_table(_table([dict(m=1, n=8, k=8, cfg=CFG)] * 2), "t")
    with pytest.raises(ValueError, match="'gemm' list"):
        tuned_tiles.parse_table({"device": "x"}, "t")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: cannot be read as JSON"):
        tuned_tiles._load(str(bad))


def test_shipped_tables_parse_and_name_their_device():
    files = sorted(tuned_tiles.TUNED_DIR.glob("*.json"))
    for f in files:
        data = json.loads(f.read_text())
        assert tuned_tiles.device_file(data["device"]) == f, f"{f.name} is not the file of {data['device']!r}"
        table = tuned_tiles.parse_table(data, str(f))
        assert table, f"{f} has no entries"
        for e in data["gemm"]:  # a tile is shipped only where it was measured faster
            assert e["us"] < e["default_us"], e


def test_pick_config_takes_the_table_and_stays_exact(tmp_path):
    """Under the interpreter with $ROTQUANT_GEMM_TILES: pick_config returns the table's tile for
    the bucket, the heuristic elsewhere, and the GEMM with that tile equals the reference."""
    pytest.importorskip("triton")
    tile = dict(CFG, BN=16, BKP=64, SPLIT_K=4)
    f = tmp_path / "tiles.json"
    f.write_text(json.dumps(_table([dict(m=4, n=48, k=320, cfg=tile)])))
    code = f"""
import torch
from vllm_rotquant.kernels import triton_gemm, reference as ref
from vllm_rotquant.kernels.layout import prepare_weight
cpu = torch.device("cpu")
assert triton_gemm.pick_config(3, 48, 320, 0, cpu) == {tile!r}
assert triton_gemm.pick_config(5, 48, 320, 0, cpu) == triton_gemm.heuristic_config(5, 48, 320, 0, cpu)
assert triton_gemm.pick_config(3, 48, 320, 32, cpu) == triton_gemm.heuristic_config(3, 48, 320, 32, cpu)
g = torch.Generator().manual_seed(0)
w = torch.randint(-8, 8, (48, 320), generator=g, dtype=torch.int8)
sw = (torch.rand(48, 1, generator=g) * 0.02 + 1e-4).to(torch.bfloat16)
qa = torch.randint(-8, 8, (3, 320), generator=g, dtype=torch.int8)
sa = torch.rand(3, 1, generator=g) * 0.1 + 1e-3
out = triton_gemm.w4a4_gemm(qa, sa, prepare_weight(w), sw, torch.float32)  # (the interpreter's bf16 cast is numpy's)
assert torch.equal(out, ref.w4a4_gemm_ref(qa, sa, w, sw, torch.float32))
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", ROTQUANT_GEMM_TILES=str(f))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]

"""Measured GEMM tiles per GPU model, for the decode regime where the heuristic tiles of
`triton_gemm.pick_config` leave most of the HBM bandwidth unused (issue 16).

A table is a JSON file written by `bench/bench_kernels.py --sweep-decode --write-tuned FILE` on the
GPU it describes (the same mechanism as vLLM's per-device fused-MoE configs):

    {"device": "NVIDIA H200", "triton": "3.6.0", "command": "...",
     "gemm": [{"m": 1, "n": 4096, "k": 4096, "cfg": {"BM": 16, "BN": 64, ...}, "us": 3.9,
               "default_us": 6.5}, ...]}

An entry's `m` is the upper end of an M bucket: a call with M rows takes the entry of its (N, K)
with the smallest `m` >= M; past the largest bucket (or for shapes, devices and group-wise weights
without a table) the heuristic applies. Tables ship in kernels/tuned/<device name>.json;
ROTQUANT_GEMM_TILES=FILE replaces the shipped table of every device with FILE (tuning a new GPU).
Every tile is exact (the kernel's integer result does not depend on it), so a table changes
speed only; a malformed one is an error naming the file and the entry, never silently ignored.
"""
from __future__ import annotations

import bisect
import functools
import json
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

TUNED_DIR = Path(__file__).with_name("tuned")
ENV = "ROTQUANT_GEMM_TILES"
_KEYS = {"BM", "BN", "BKP", "num_warps", "num_stages", "SPLIT_K", "GROUP_M"}


def device_file(device_name: str) -> Path:
    """Where the shipped table of a GPU model lives (the name with non-alphanumerics as '_')."""
    return TUNED_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def _pow2(v) -> bool:
    return isinstance(v, int) and v > 0 and v & (v - 1) == 0


def _check_cfg(cfg, where: str) -> dict:
    if not isinstance(cfg, dict) or set(cfg) != _KEYS:
        raise ValueError(f"{where}: cfg must have exactly the keys {sorted(_KEYS)}, got "
                         f"{sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__}")
    for key in ("BM", "BN", "BKP", "num_warps", "SPLIT_K", "GROUP_M"):
        if not _pow2(cfg[key]):
            raise ValueError(f"{where}: cfg[{key!r}] must be a positive power of two, got {cfg[key]!r}")
    if cfg["BM"] < 16 or cfg["BN"] < 16 or cfg["BKP"] < 16:
        raise ValueError(f"{where}: BM, BN and BKP must be >= 16 (tensor-core tiles), got {cfg}")
    if not isinstance(cfg["num_stages"], int) or not 1 <= cfg["num_stages"] <= 8:
        raise ValueError(f"{where}: cfg['num_stages'] must be an integer in 1..8, got {cfg['num_stages']!r}")
    return dict(cfg)


def parse_table(data, source: str) -> dict:
    """{(n, k): ([bucket m ascending], [cfg])} from a table's JSON object; errors name `source`."""
    if not isinstance(data, dict) or not isinstance(data.get("gemm"), list):
        raise ValueError(f"{source}: a tuned-tile table is a JSON object with a 'gemm' list")
    table: dict = {}
    for i, e in enumerate(data["gemm"]):
        where = f"{source}: gemm[{i}]"
        if not isinstance(e, dict) or not all(isinstance(e.get(f), int) and e[f] > 0 for f in ("m", "n", "k")):
            raise ValueError(f"{where}: needs positive integers 'm', 'n', 'k', got {e!r}")
        ms, cfgs = table.setdefault((e["n"], e["k"]), ([], []))
        if e["m"] in ms:
            raise ValueError(f"{where}: a second entry for m={e['m']} n={e['n']} k={e['k']}")
        j = bisect.bisect(ms, e["m"])
        ms.insert(j, e["m"])
        cfgs.insert(j, _check_cfg(e.get("cfg"), where))
    return table


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"tuned-tile table {path}: cannot be read as JSON ({exc})") from exc
    table = parse_table(data, path)
    logger.info("rotquant: GEMM tiles for %d shapes from %s", len(table), path)
    return table


@functools.lru_cache(maxsize=None)
def table_for(device_name: str) -> dict:
    """The table in force for a GPU model: $ROTQUANT_GEMM_TILES, else the shipped file, else {}."""
    override = os.environ.get(ENV)
    if override:
        return _load(str(Path(override).resolve()))
    f = device_file(device_name)
    return _load(str(f)) if f.is_file() else {}


def lookup(table: dict, m: int, n: int, k: int) -> dict | None:
    """The tuned cfg for M rows of an (N, K) GEMM, or None (no entry, or M past the buckets)."""
    hit = table.get((n, k))
    if hit is None:
        return None
    ms, cfgs = hit
    j = bisect.bisect_left(ms, m)
    return dict(cfgs[j]) if j < len(ms) else None

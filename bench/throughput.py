"""Throughput: the paper's protocol (a plain loop over `model.generate`) vs rayq serial vs rayq batched.

Same model, precision and completions for all three, in this one process, taken in
alternating rounds so that the shared machine's noise falls on all of them alike; each
method's best round is reported, and the ratios between them. rayq's paths run the model
host itself (metrics and row building included), without Ray, so the ratios measure
decoding and the engine's own overhead, not actor-call latency.

    .venv/bin/python bench/throughput.py [--model bundled:smollm2-135m-instruct] [--precision fp32]
        [--prompts 10] [--seeds 2] [--max-new-tokens 32] [--batch-size 10] [--rounds 2] [--threads 1]

Last line: `speedup batched/plain-loop: N.NNx`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rayq import planner, spec
from rayq.host import ModelHost

ROY_PROMPTS = spec.load(Path(__file__).resolve().parent.parent / "sweeps" / "roy2023.yaml").prompt_texts


def completions(args: argparse.Namespace) -> list[dict[str, Any]]:
    kind, _, value = args.model.partition(":")
    sweep = spec.parse(
        {
            "name": "bench",
            "models": [{"name": "bench", kind: value}],
            "precisions": [args.precision],
            "prompts": list(ROY_PROMPTS[: args.prompts]),
            "grid": {"max_new_tokens": [args.max_new_tokens], "temperature": [0.7], "top_k": [50]},
            "seeds": args.seeds,
        }
    )
    m = sweep.spec.models[0]
    return [c.to_dict() for c in planner.iter_completions(sweep, m, args.precision)]


def plain_loop(model: Any, tok: Any, comps: list[dict[str, Any]]) -> int:
    """The paper's protocol: one `generate` call per completion, nothing else."""
    import torch

    tokens = 0
    for c in comps:
        p = c["params"]
        enc = tok(c["prompt"], return_tensors="pt")
        torch.manual_seed(c["sampling_seed"])
        out = model.generate(
            **enc,
            max_new_tokens=p["max_new_tokens"],
            do_sample=True,
            temperature=p["temperature"],
            top_k=p["top_k"],
            top_p=p["top_p"],
            pad_token_id=tok.eos_token_id,
        )
        tokens += out.shape[1] - enc["input_ids"].shape[1]
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=float, default=1)
    args = ap.parse_args()

    comps = completions(args)
    model_spec = {"name": "bench", "source": args.model}
    serial = ModelHost("bench", model_spec, args.precision, args.threads, "serial", 1)
    batched = ModelHost("bench", model_spec, args.precision, args.threads, "batched", args.batch_size)
    assert serial.load_error is None, serial.load_error
    print(
        f"model {args.model} {args.precision}, device {serial.device}, torch threads {serial.threads}, "
        f"{len(comps)} completions of up to {args.max_new_tokens} new tokens, batch size {args.batch_size}"
    )

    def run_plain() -> int:
        return plain_loop(serial.model, serial.tokenizer, comps)

    def run_host(host: ModelHost) -> int:
        rows = host.generate(comps)
        assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]][:1]
        return sum(r["n_new_tokens"] for r in rows)

    methods = {
        "plain-loop": run_plain,
        "rayq-serial": lambda: run_host(serial),
        "rayq-batched": lambda: run_host(batched),
    }
    best: dict[str, tuple[float, int]] = {}
    run_plain()  # warm-up: first-call allocations and kernel selection
    for r in range(args.rounds):
        for name, fn in methods.items():
            t = time.perf_counter()
            tokens = fn()
            wall = time.perf_counter() - t
            print(
                f"round {r + 1} {name:13s} {wall:7.2f} s  {len(comps) / wall:6.2f} completions/s  "
                f"{tokens / wall:7.1f} tokens/s"
            )
            if name not in best or wall < best[name][0]:
                best[name] = (wall, tokens)
    rate = {n: t / w for n, (w, t) in best.items()}
    for n, (w, t) in best.items():
        print(f"best {n:13s} {len(comps) / w:6.2f} completions/s  {t / w:7.1f} generated tokens/s")
    print(f"rayq-serial/plain-loop (tokens/s): {rate['rayq-serial'] / rate['plain-loop']:.3f}")
    print(f"speedup batched/plain-loop: {rate['rayq-batched'] / rate['plain-loop']:.2f}x")


if __name__ == "__main__":
    main()

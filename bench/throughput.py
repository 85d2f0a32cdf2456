"""Throughput: the paper's protocol (a plain loop over `model.generate`) vs rayq batched vs rayq on vLLM.

The same completions for all three, with a Roy-like mix of max_new_tokens (not a single
length), in this one process, taken in alternating rounds so that the shared machine's noise
falls on all of them alike; each method's best round is reported, and the ratios between them
in generated tokens per second. rayq's paths run the model hosts themselves (metrics and row
building included), without Ray, so the ratios measure decoding and the engine's own overhead,
not actor-call latency. Greedy sharing is off: every completion is decoded.

    .venv/bin/python bench/throughput.py [--model bundled:smollm2-135m-instruct] [--precision bf16]
        [--prompts 10] [--seeds 1] [--max-new-tokens 16,32,48,64] [--batch-size 40] [--rounds 2]
        [--threads 1] [--no-vllm] [--serial] [--fixed] [--no-plain]
    .venv/bin/python bench/throughput.py --tiny   # seconds: a tiny random model (TINY below)

`--fixed` also times rayq's loop fed one batch at a time (sorted by max_new_tokens, no row
joining a running batch: how it batched before rows could join), and counts each method's
forward passes: on a CPU a step costs in proportion to its rows, so tokens/s barely differ,
while a GPU step at these batch sizes costs about the same whatever its rows (weights read
once), so forward passes are what it pays. It shows something only with more completions than
the batch size, e.g. a Roy block scaled down (10 prompts x 10 lengths, batch 32 as on a GPU):
`--max-new-tokens 8,16,24,32,40,48,56,64,72,80 --batch-size 32 --fixed --no-vllm --no-plain`
(`--no-plain` leaves out the slow plain loop, and with it the speedup lines).

Last lines: `speedup batched/plain-loop: N.NNx` and `speedup vllm/plain-loop: N.NNx`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rayq.host.config import HostConfig
from rayq.host.transformers_host import ModelHost
from rayq.planning import planner, spec

ROY_PROMPTS = spec.load(Path(__file__).resolve().parent.parent / "sweeps" / "roy2023.yaml").prompt_texts
# `--tiny`: the tests' random 2-layer Llama (tests/conftest.py, written to a temporary directory),
# 6 completions, every transformers method once, batches of 4 (so --fixed runs two); not vLLM,
# whose engine start alone outlasts the tiny budget.
TINY: dict[str, Any] = {
    "precision": "fp32", "prompts": 3, "seeds": 1, "max_new_tokens": [4, 8], "batch_size": 4, "rounds": 1,
    "no_vllm": True, "serial": True, "fixed": True, "no_plain": False,
}  # fmt: skip


def completions(args: argparse.Namespace) -> list[dict[str, Any]]:
    kind, _, value = args.model.partition(":")
    sweep = spec.parse(
        {
            "name": "bench",
            "models": [{"name": "bench", kind: value}],
            "precisions": [args.precision],
            "prompts": list(ROY_PROMPTS[: args.prompts]),
            "grid": {"max_new_tokens": args.max_new_tokens, "temperature": [0.7], "top_k": [50]},
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


def roofline(host: ModelHost, rate: dict[str, float], batch_size: int) -> None:
    """The share of the GPU's datasheet memory bandwidth each method's weight reads reach: decoding
    reads every weight once per step, so bytes/s = weight bytes x steps/s, with steps/s = tokens/s
    at batch 1 and tokens/s / batch size when batched (an upper bound on steps, as rows end early)."""
    from rayq.host import measure
    from rayq.planning import throughput

    gpu = throughput.gpu_type_of_device(host.runner.device)
    if gpu is None:
        print(f"roofline: unknown GPU type {host.runner.device!r}; add it to rayq.planning.throughput.GPU_TYPES")
        return
    bandwidth = throughput.GPU_TYPES[gpu].bandwidth
    weights = measure.held_bytes(host.engine.model)
    for name, r in rate.items():
        steps = r if name in ("plain-loop", "rayq-serial") else r / batch_size
        print(
            f"roofline {name:13s} {weights * steps / 1e9:8.1f} GB/s of weights = "
            f"{weights * steps / bandwidth:6.1%} of {gpu}'s {bandwidth / 1e12:.2f} TB/s"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--precision", default="bf16")  # the model's native dtype, the paper's baseline
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=lambda v: [int(x) for x in v.split(",")], default=[16, 32, 48, 64])
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=float, default=1)
    ap.add_argument("--no-vllm", action="store_true", help="leave out rayq on vLLM (not installed)")
    ap.add_argument("--serial", action="store_true", help="also time rayq serial (one generate per completion)")
    ap.add_argument("--fixed", action="store_true", help="also time rayq batched one fixed batch at a time")
    ap.add_argument("--no-plain", action="store_true", help="leave out the plain loop (and the speedup lines)")
    ap.add_argument("--tiny", action="store_true", help="seconds, for tests/test_bench.py: see TINY")
    args = ap.parse_args()
    if args.tiny:
        import sys
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.conftest import build_tiny_model

        tmp = tempfile.TemporaryDirectory(prefix="rayq-bench-throughput-")  # removed when main returns
        vars(args).update(TINY, model=f"path:{build_tiny_model(Path(tmp.name) / 'tiny')}")

    comps = completions(args)
    config = HostConfig(sweep="bench", model="bench", source=args.model, precision=args.precision,
                        num_cpus=args.threads, num_gpus=0, layer_sqnr=False, share_greedy=False)  # fmt: skip
    batching = replace(config, protocol="batched", batch_size=args.batch_size)
    serial = ModelHost(config)
    batched = ModelHost(batching)
    assert serial.runner.load_error is None, serial.runner.load_error
    hosts: dict[str, Any] = {"rayq-batched": batched}
    if args.serial:
        hosts["rayq-serial"] = serial
    if not args.no_vllm:
        from rayq.host.vllm_host import VllmHost

        vllm = VllmHost(batching)
        assert vllm.runner.load_error is None, vllm.runner.load_error
        hosts["rayq-vllm"] = vllm
    lengths = sorted({c["params"]["max_new_tokens"] for c in comps})
    print(
        f"model {args.model} {args.precision}, device {serial.runner.device}, torch threads {config.threads}, "
        f"{len(comps)} completions, max_new_tokens mix {lengths}, batch size {args.batch_size}"
    )

    def run_plain() -> int:
        return plain_loop(serial.engine.model, serial.engine.tokenizer, comps)

    def run_host(host: Any, todo: list[dict[str, Any]] = comps) -> int:
        rows = host.generate(todo)
        assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]][:1]
        return sum(r["n_new_tokens"] for r in rows)

    def run_fixed() -> int:
        todo = sorted(comps, key=lambda c: c["params"]["max_new_tokens"])
        return sum(run_host(batched, todo[i : i + args.batch_size]) for i in range(0, len(todo), args.batch_size))

    methods: dict[str, Any] = {} if args.no_plain else {"plain-loop": run_plain}
    for name, host in hosts.items():
        methods[name] = lambda host=host: run_host(host)
    if args.fixed:
        methods["rayq-fixed"] = run_fixed
    best: dict[str, tuple[float, int]] = {}
    passes: dict[str, int] = {}
    counted = [0]
    batched.engine.model.register_forward_pre_hook(lambda *_: counted.__setitem__(0, counted[0] + 1))
    plain_loop(serial.engine.model, serial.engine.tokenizer, comps[:2])  # warm-up: first allocations, kernels
    for r in range(args.rounds):
        for name, fn in methods.items():
            counted[0] = 0
            t = time.perf_counter()
            tokens = fn()
            wall = time.perf_counter() - t
            passes[name] = counted[0]
            print(
                f"round {r + 1} {name:13s} {wall:7.2f} s  {len(comps) / wall:6.2f} completions/s  "
                f"{tokens / wall:7.1f} tokens/s",
                flush=True,
            )
            if name not in best or wall < best[name][0]:
                best[name] = (wall, tokens)
    rate = {n: t / w for n, (w, t) in best.items()}
    for n, (w, t) in best.items():
        print(f"best {n:13s} {len(comps) / w:6.2f} completions/s  {t / w:7.1f} generated tokens/s")
    if "rayq-serial" in rate:
        print(f"rayq-serial/plain-loop (tokens/s): {rate['rayq-serial'] / rate['plain-loop']:.3f}")
    if "rayq-fixed" in rate:
        print(f"forward passes: rayq-batched {passes['rayq-batched']}, rayq-fixed {passes['rayq-fixed']}")
        print(f"forward passes fixed/joining: {passes['rayq-fixed'] / passes['rayq-batched']:.2f}x")
        print(f"rows joining / fixed batches (tokens/s): {rate['rayq-batched'] / rate['rayq-fixed']:.2f}x")
    if serial.runner.device.startswith("cuda"):
        roofline(serial, rate, args.batch_size)
    if "plain-loop" not in rate:
        return
    print(f"speedup batched/plain-loop: {rate['rayq-batched'] / rate['plain-loop']:.2f}x")
    if "rayq-vllm" in rate:
        print(f"speedup vllm/plain-loop: {rate['rayq-vllm'] / rate['plain-loop']:.2f}x")


if __name__ == "__main__":
    main()

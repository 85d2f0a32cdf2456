"""What a quantization scheme costs on this machine, as ratios to fp32 measured side by side.

    .venv/bin/python bench/schemes.py [SCHEME ...]

For each scheme, on the bundled model (SmolLM2-135M-Instruct) in one process with the same
torch threads: the load (weights rounded once), the fidelity pass on the first 1,024 tokens
of rayq/fidelity.txt (window 512, stride 256; the scheme's KV cache in use) and greedy
generation of 48 tokens from one prompt. Each is timed `REPEAT` times; the median is divided
by fp32's, measured in the same round-robin, so the machine's noise mostly cancels.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT = ["fp32", "bf16", "sim-w4g128", "sim-wmxfp4", "sim-w8-a8", "sim-w8-kv4", "fp32-qkvfp8", "bnb-nf4-kv4"]
REPEAT = 3
PARAMS = {"max_new_tokens": 48, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "do_sample": False}
PARAMS |= {"repetition_penalty": 1.0, "num_beams": 1}


def main(names: list[str]) -> None:
    import torch
    from transformers import AutoTokenizer

    from rayq.host import fidelity, precisions, sim_quant, sources
    from rayq.host.decode import generate_one

    torch.set_num_threads(2)
    model_dir = str(sources.convert_bundled("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    text, _ = fidelity.read_text(None)
    if "fp32" not in names:
        names = ["fp32", *names]
    times: dict[str, dict[str, list[float]]] = {n: {"load": [], "fidelity": [], "generate": []} for n in names}
    for _ in range(REPEAT):
        for name in names:  # round robin: every scheme sees the same stretch of machine noise
            t0 = time.perf_counter()
            model, _settings = precisions.load_model(name, model_dir, "cpu", {})
            t1 = time.perf_counter()
            st = sim_quant.state(model)
            cache = None if st is None or st.scheme.kv is None else (lambda m=model: sim_quant.new_cache(m))
            fidelity.measure(model, tok, text, window=512, stride=256, max_tokens=1024, new_cache=cache)
            t2 = time.perf_counter()
            generate_one(model, tok, "Life in London", PARAMS, 0)
            t3 = time.perf_counter()
            for key, dt in zip(("load", "fidelity", "generate"), (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[name][key].append(dt)
            del model
    base = {k: statistics.median(v) for k, v in times["fp32"].items()}
    head = f"{'scheme':<16} {'load s':>8} {'fidelity s':>11} {'generate s':>11}"
    print(head + "   ratios to fp32 (load, fidelity, generate)")
    for name in names:
        med = {k: statistics.median(v) for k, v in times[name].items()}
        ratios = ", ".join(f"{med[k] / base[k]:.2f}" for k in ("load", "fidelity", "generate"))
        print(f"{name:<16} {med['load']:>8.2f} {med['fidelity']:>11.2f} {med['generate']:>11.2f}   {ratios}")


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)

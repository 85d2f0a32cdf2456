"""A sweep of quantization schemes through the real engine (local Ray, tiny model): every host
measures its fidelity against the baseline, measured once and kept; a resumed sweep that adds
schemes reuses it; the report gets its design-space section from the Parquet files."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pytest

from rayq import report
from rayq.catalog import precisions
from rayq.execution.baseline import FOLDER
from rayq.execution.driver import run_sweep
from rayq.planning import spec
from tests.conftest import WORDS, sweep_dict

SCHEMES = ["fp32", "sim-w8", "sim-w4g32", "sim-w8-kv4", "sim-w8-a4"]


def models_table(out: Path) -> pl.DataFrame:
    df = pl.scan_parquet(str(out / "models" / "**" / "*.parquet"), hive_partitioning=True).collect()
    return df.sort("precision")


def test_a_scheme_sweep_measures_fidelity_once_and_reports_the_design_space(
    tmp_path: Path, tiny_model: Path, local_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(1)
    (tmp_path / "eval.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(200)))
    data = sweep_dict(
        tiny_model,
        precisions=SCHEMES[:3],
        grid={"max_new_tokens": [6], "temperature": [0.7], "top_k": [50]},
        fidelity={"text": "eval.txt", "window": 64, "stride": 32, "top_k": 16},  # relative to the sweep file
    )
    sweep = spec.parse(data, str(tmp_path / "s.yaml"), base_dir=tmp_path)
    out = tmp_path / "out"
    first = run_sweep(sweep, out, quiet=False)
    assert first.complete and first.written == 9
    log = capsys.readouterr().out
    assert log.count("measuring the fidelity baseline tiny/fp32") == 1
    refs = list((out / FOLDER / "model=tiny").glob("*.npz"))
    assert len(refs) == 1

    m = models_table(out)
    assert m["precision"].to_list() == ["fp32", "sim-w4g32", "sim-w8"]
    assert (m["fidelity_text"] == "eval.txt").all() and (m["fidelity_baseline"] == "fp32").all()
    assert m["fidelity_error"].is_null().all() and (m["fidelity_tokens"] == 199).all()
    kl = dict(zip(m["precision"], m["kl_div"], strict=True))
    agree = dict(zip(m["precision"], m["top1_agreement"], strict=True))
    assert abs(kl["fp32"]) < 1e-6 and agree["fp32"] == 1.0  # the baseline host against the kept reference
    assert 0 < kl["sim-w8"] < kl["sim-w4g32"] and agree["sim-w4g32"] < 1
    assert dict(zip(m["precision"], m["weight_format"], strict=True)) == {
        "fp32": "fp32",
        "sim-w4g32": "int4 g32 asym",
        "sim-w8": "int8 per-channel asym",
    }

    # Adding schemes: the baseline is read back, not measured again, and the new hosts compare with it.
    more = spec.parse({**data, "precisions": SCHEMES}, str(tmp_path / "s.yaml"), base_dir=tmp_path)
    second = run_sweep(more, out, quiet=False)
    assert second.complete and second.written == 6
    assert "measuring the fidelity baseline" not in capsys.readouterr().out
    assert list((out / FOLDER / "model=tiny").glob("*.npz")) == refs
    m = models_table(out)
    row = {p: r for p, r in zip(m["precision"], m.iter_rows(named=True), strict=True)}
    assert row["sim-w8-kv4"]["kv_cache"] == "sim" and row["sim-w8-kv4"]["kv_bits"] == 4
    assert row["sim-w8-kv4"]["kv_sqnr_db"] > 0 and row["sim-w8-kv4"]["kl_div"] > 0
    assert row["sim-w8-a4"]["act_bits"] == 4 and row["sim-w8-a4"]["act_sqnr_db"] > 0
    completions = pl.scan_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True).collect()
    kv = dict(completions.group_by("precision").agg(pl.col("kv_cache").unique().first()).iter_rows())
    assert kv["sim-w8-kv4"] == "sim" and kv["fp32"] == "default" and completions.height == 15

    _html, md = report.write(out, n_boot=50)
    text = Path(md).read_text()
    for title in ("sim-w8-kv4", "leave one scheme out", "KV"):
        assert title in text, title


@pytest.mark.skipif(not precisions.missing_packages(precisions.get("fp32-qkv4hqq")), reason="hqq is installed here")
def test_a_baseline_that_cannot_load_costs_the_kl_columns_not_the_sweep(
    tmp_path: Path, tiny_model: Path, local_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The preflight refuses a precision whose package is missing here; the hosts (Ray actors,
    # other processes) meet it as a cluster's worker would, which is what is tested.
    monkeypatch.setattr("rayq.planning.preflight.missing_packages", lambda _sweep: [])
    data = sweep_dict(
        tiny_model,
        precisions=["fp32-qkv4hqq", "sim-w8"],  # the baseline needs hqq, which is not installed
        grid={"max_new_tokens": [4], "temperature": [0.7], "top_k": [50]},
        fidelity={"window": 64, "stride": 32, "max_tokens": 150},
    )
    out = tmp_path / "out"
    result = run_sweep(spec.parse(data, str(tmp_path / "s.yaml"), base_dir=tmp_path), out, quiet=True)
    assert result.written == 6
    m = models_table(out)
    row = {p: r for p, r in zip(m["precision"], m.iter_rows(named=True), strict=True)}
    assert row["fp32-qkv4hqq"]["load_status"] == "error"
    other = row["sim-w8"]
    assert other["load_status"] == "ok" and other["ppl"] > 1 and other["fidelity_tokens"] == 149
    assert other["kl_div"] is None and other["top1_agreement"] is None
    assert other["fidelity_error"].startswith("no baseline reference") and "hqq" in other["fidelity_error"]
    assert not list((out / FOLDER).rglob("*.npz"))
    status = pl.scan_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert dict(status.group_by("precision").agg(pl.col("status").unique().first()).iter_rows()) == {
        "fp32-qkv4hqq": "error",
        "sim-w8": "ok",
    }

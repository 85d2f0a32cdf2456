"""The design-space section of the report, on a synthetic sweep whose fidelity follows a known law of SQNR.

KL is planted as ln KL = A + B * effective SQNR + noise, so the fit has an answer to recover;
everything is written through rayq.store.dataset as a host would, and read back through the report.
No model, no torch, no Ray.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rayq.report import build, design_space, write
from rayq.report.design_space import effective_sqnr, fit_loo, nominal_weight_bits
from rayq.store.dataset import SCHEMA, Store

A, B, NOISE = 0.5, -0.23, 0.25  # the planted law and its scatter (natural-log units)
PPL_BASE = 12.0
OLD_KEYS = {"status", "memory", "speed", "slopes", "comparison", "divergence", "sqnr", "gptq"}
OLD_FIGURES = ["temperature", "max_returned_tokens", "top_k"]

# precision: (weight_format, weight_bits, act_bits, kv_bits, weight SQNR dB or None = unquantized, act, kv)
SCHEMES: dict[str, tuple[str, float, int | None, int | None, float | None, float | None, float | None]] = {
    "bf16": ("bf16", 16.0, None, None, None, None, None),
    "sim-w8": ("int8 per-channel sym", 8.03, None, None, 40.0, None, None),
    "sim-w6g128": ("int6 g128 asym", 6.25, None, None, 30.0, None, None),
    "sim-w4g128": ("int4 g128 asym", 4.25, None, None, 21.0, None, None),
    "sim-wfp4": ("fp4 per-channel", 4.03, None, None, 17.5, None, None),
    "sim-wmxfp4": ("mxfp4 (block 32)", 4.25, None, None, 18.5, None, None),
    "sim-w3g128": ("int3 g128 asym", 3.25, None, None, 15.0, None, None),
    "sim-w2g64": ("int2 g64 asym", 2.5, None, None, 8.0, None, None),
    "sim-w8a8": ("int8 per-channel sym", 8.03, 8, None, 40.0, 28.0, None),
    "sim-w4-kv4": ("int4 per-channel asym", 4.03, None, 4, 21.0, None, 19.0),
}
LAYER_SPREAD = (-3.0, -1.0, 1.0, 3.0)  # per-layer SQNR around the scheme's mean: the worst is mean - 3


def planted_eff(precision: str) -> float:
    """The effective SQNR computed here independently of the module under test."""
    _, _, _, _, w, a, kv = SCHEMES[precision]
    nsr = sum(10 ** (-s / 10) for s in (w, a, kv) if s is not None)
    return -10 * math.log10(nsr) if nsr else math.inf


def planted_kl() -> dict[str, float]:
    rng = np.random.default_rng(7)
    return {p: 0.0 if p == "bf16" else math.exp(A + B * planted_eff(p) + rng.normal(0, NOISE)) for p in SCHEMES}


def completion_rows(model: str, precision: str, dup_shift: float) -> list[dict[str, Any]]:
    rows = []
    for prompt in range(3):
        for seed in range(2):
            for mnt in (8, 16):
                for temp in (0.5, 1.0):
                    for k in (1, 50):
                        row: dict[str, Any] = dict.fromkeys(SCHEMA.names)
                        dup = int(1 + mnt // 8 + dup_shift + (prompt + seed) % 2)
                        row.update(
                            completion_id=f"{model}-{precision}-{prompt}-{seed}-{mnt}-{temp}-{k}", sweep="design",
                            prompt_id=prompt, prompt=f"p{prompt}", max_new_tokens=mnt, temperature=temp, top_k=k,
                            top_p=1.0, do_sample=True, seed=seed, sampling_seed=seed, text="x", n_prompt_tokens=3,
                            n_new_tokens=mnt, max_returned_tokens=mnt, latency_s=1.0, tokens_per_s=10.0 + seed,
                            content_words=10 + dup, duplicate_content_words=dup, status="ok", protocol="serial",
                        )  # fmt: skip
                        rows.append(row)
    return rows


def write_sweep(root: Path, fidelity: bool = True, precisions: tuple[str, ...] = tuple(SCHEMES)) -> dict[str, float]:
    store = Store(root)
    kl = planted_kl()
    rng = np.random.default_rng(11)
    for p in precisions:
        fmt, bits, act_bits, kv_bits, w, a, kv = SCHEMES[p]
        info: dict[str, Any] = {"model": "m", "precision": p, "footprint_bytes": int(1e8 * bits), "load_s": 1.0}
        layers = [
            {"layer": f"model.layers.{i}.mlp.fc", "kind": "mlp.fc", "n_params": 4096,
             "sqnr_db": math.inf if w is None else w + d}
            for i, d in enumerate(LAYER_SPREAD)
        ]  # fmt: skip
        info["layers"] = layers
        if fidelity:
            ppl = PPL_BASE * (1.0 if p == "bf16" else math.exp(0.9 * kl[p] * math.exp(rng.normal(0, 0.1))))
            info.update(
                weight_format=fmt, weight_bits=bits, act_bits=act_bits, kv_bits=kv_bits,
                kv_cache="sim" if kv_bits else "default", act_sqnr_db=a, kv_sqnr_db=kv,
                fidelity_text="wiki", fidelity_tokens=2048, fidelity_baseline="bf16", ppl=ppl, kl_div=kl[p],
                top1_agreement=1.0 if p == "bf16" else max(0.0, 1.0 - 2 * kl[p]),
            )  # fmt: skip
        store.write_model_info("design", info)
        store.write("m", p, completion_rows("m", p, dup_shift=3.0 if p == "sim-w2g64" else 0.0))
    return kl


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("design")
    write_sweep(root)
    return root


@pytest.fixture(scope="module")
def space(sweep: Path) -> design_space.DesignSpace:
    from rayq.store.query import open as open_dataset

    data = open_dataset(sweep)
    return design_space.analyse(data.models.collect(), data.layers.collect(), data.completions.collect())


def test_effective_sqnr_adds_noise_powers() -> None:
    assert effective_sqnr([20.0, 20.0]) == pytest.approx(20 - 10 * math.log10(2))
    assert effective_sqnr([30.0]) == pytest.approx(30.0)
    assert effective_sqnr([30.0, math.inf]) == pytest.approx(30.0)  # an exact source adds no noise
    assert effective_sqnr([]) == math.inf


def test_nominal_bits_read_from_the_format_name() -> None:
    cases = {
        "int4 g128 asym": 4, "fp4 per-channel": 4, "fp4 e2m1 per-channel": 4, "mxfp4 (block 32)": 4,
        "mxint8": 8, "fp6e2m3 g128": 6, "nf4 (bitsandbytes)": 4, "bnb-nf4": 4, "fp32": 32, "bf16": 16,
    }  # fmt: skip
    assert {f: nominal_weight_bits(f, None) for f in cases} == cases
    assert nominal_weight_bits(None, 4.25) == 4 and nominal_weight_bits("gptq", 8.06) == 8
    assert nominal_weight_bits(None, None) is None


def test_fit_recovers_the_planted_law(space: design_space.DesignSpace) -> None:
    f = space.fits.simple["KL"]
    assert f is not None and f.n == len(SCHEMES) - 1  # every scheme but the baseline
    assert f.coef[1] == pytest.approx(B, abs=0.05)
    assert f.coef[0] == pytest.approx(A, abs=1.0)
    assert f.r2 > 0.9
    assert math.isfinite(f.mae_loo) and f.mae_loo > f.mae_in
    assert f.mae_loo < 3 * NOISE  # held out, the law still predicts within the planted scatter's order
    # ppl was planted as ln(ppl/ppl_base) ≈ 0.9 KL: the loss increase follows the same slope
    g = space.fits.simple["ln(ppl/ppl_base)"]
    assert g is not None and g.coef[1] == pytest.approx(B, abs=0.07)


def test_loo_is_a_refit_without_each_point() -> None:
    rng = np.random.default_rng(0)
    x = np.linspace(5, 40, 8)
    y = np.exp(1.0 - 0.2 * x + rng.normal(0, 0.3, x.size))
    f = fit_loo(x, y)
    assert f is not None
    for i in (0, 4, 7):
        keep = np.arange(x.size) != i
        slope, intercept = np.polyfit(x[keep], np.log(y[keep]), 1)
        assert f.loo[i] == pytest.approx(intercept + slope * x[i])
    assert fit_loo(x[:2], y[:2]) is None  # two points: no held-out error to speak of
    assert fit_loo(np.full(5, 10.0), y[:5]) is None  # SQNR never varies: no slope


def test_sqnr_table_ranks_by_kl_and_baseline_has_no_loss(space: design_space.DesignSpace) -> None:
    t = space.tables()["design_sqnr"]
    col = {c: i for i, c in enumerate(t.columns)}
    kls = [r[col["KL"]] for r in t.rows]
    assert kls == sorted(kls) and len(t.rows) == len(SCHEMES)
    assert [r[col["rank"]] for r in t.rows] == list(range(1, len(SCHEMES) + 1))
    first = t.rows[0]
    assert first[col["precision"]] == "bf16" and first[col["Δppl"]] == 0 and first[col["KL"]] == 0
    assert first[col["effective SQNR dB"]] == "∞"
    assert t.rows[-1][col["precision"]] == "sim-w2g64"  # the loudest noise loses most
    row = {r[col["precision"]]: r for r in t.rows}
    assert row["sim-w4g128"][col["W SQNR mean dB"]] == 21.0 and row["sim-w4g128"][col["W SQNR worst dB"]] == 18.0
    assert row["sim-w8a8"][col["effective SQNR dB"]] == pytest.approx(planted_eff("sim-w8a8"), abs=0.01)
    assert row["sim-w4-kv4"][col["KV SQNR dB"]] == 19.0


def test_fit_tables(space: design_space.DesignSpace) -> None:
    tabs = space.tables()
    fit = tabs["design_fit"]
    col = {c: i for i, c in enumerate(fit.columns)}
    by = {(r[col["target"]], r[col["predictors"]]): r for r in fit.rows}
    kl = by[("KL", "effective SQNR")]
    assert kl[col["n"]] == len(SCHEMES) - 1 and kl[col["per dB effective SQNR"]] < 0
    assert kl[col["held-out factor ×"]] == pytest.approx(math.exp(kl[col["MAE held out (ln)"]]), abs=0.02)
    assert ("KL", "effective SQNR + worst layer") in by
    per = tabs["design_fit_schemes"]
    pc = {c: i for i, c in enumerate(per.columns)}
    assert len(per.rows) == len(SCHEMES) - 1 and all(r[pc["precision"]] != "bf16" for r in per.rows)
    planted = planted_kl()
    for r in per.rows:
        assert r[pc["KL"]] == pytest.approx(planted[r[pc["precision"]]], rel=1e-3)
        assert 0.2 < r[pc["observed / held out"]] < 5


def test_bits_tables_group_by_nominal_bits(space: design_space.DesignSpace) -> None:
    tabs = space.tables()
    w = tabs["design_bits_weight"]
    wc = {c: i for i, c in enumerate(w.columns)}
    assert w.rows[0][wc["precision"]] == "bf16" and w.rows[0][wc["W bits"]] == 16
    bits = [r[wc["W bits"]] for r in w.rows[1:]]
    assert bits == sorted(bits, reverse=True) and set(bits) == {8, 6, 4, 3, 2}
    fours = [r[wc["precision"]] for r in w.rows if r[wc["W bits"]] == 4]
    assert set(fours) == {"sim-w4g128", "sim-wfp4", "sim-wmxfp4"}
    dup = {r[wc["precision"]]: r[wc["mean duplicates"]] for r in w.rows}
    assert dup["sim-w2g64"] == pytest.approx(dup["bf16"] + 3)
    assert w.rows[0][wc["ok completions"]] == 48
    a = tabs["design_bits_act"]
    assert [r[1] for r in a.rows] == ["W16", "W8A8"]
    kv = tabs["design_bits_kv"]
    kc = {c: i for i, c in enumerate(kv.columns)}
    assert [r[kc["scheme"]] for r in kv.rows] == ["W16", "W4KV4"] and kv.rows[1][kc["KV cache"]] == "sim"


def test_full_report_shows_the_design_space(sweep: Path, tmp_path: Path) -> None:
    r = build(sweep, n_boot=50)
    assert set(design_space.KEYS) <= set(r.tables) and OLD_KEYS <= set(r.tables)
    assert [f.key for f in r.figures] == [*OLD_FIGURES, "design_sqnr_kl"]
    html_path, md_path = write(sweep, tmp_path / "r.html", n_boot=50)
    page, md = html_path.read_text(), md_path.read_text()
    for key in design_space.KEYS:
        assert f'id="table-{key}"' in page, key
        assert f"## {r.tables[key].title}" in md, key
    assert 'id="figure-design_sqnr_kl"' in page
    assert (tmp_path / "r_files" / "design_sqnr_kl.png").stat().st_size > 1000


def test_too_few_schemes_say_why_there_is_no_fit(tmp_path: Path) -> None:
    write_sweep(tmp_path, precisions=("bf16", "sim-w8", "sim-w4g128"))
    failed = {"model": "m", "precision": "sim-w3g128", "weight_format": "int3 g128 asym", "fidelity_error": "oom"}
    Store(tmp_path).write_model_info("design", failed)
    r = build(tmp_path, n_boot=20)
    fit = r.tables["design_fit"]
    assert fit.rows == [] and "at least 3" in fit.note
    assert r.tables["design_fit_schemes"].rows == [] and "at least 3" in r.tables["design_fit_schemes"].note
    sq = r.tables["design_sqnr"]
    assert len(sq.rows) == 3 and "Fidelity failed for: m/sim-w3g128 (oom)" in sq.note
    assert "design_sqnr_kl" not in [f.key for f in r.figures]


def test_a_sweep_without_fidelity_reports_as_before(tmp_path: Path) -> None:
    write_sweep(tmp_path, fidelity=False, precisions=("bf16", "sim-w8", "sim-w4g128"))
    r = build(tmp_path, n_boot=20)
    assert set(r.tables) == OLD_KEYS
    assert [f.key for f in r.figures] == OLD_FIGURES
    html_path, md_path = write(tmp_path, tmp_path / "r.html", n_boot=20)
    assert "design_" not in html_path.read_text() and "SQNR against fidelity" not in md_path.read_text()

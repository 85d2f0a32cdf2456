"""The quantization design space: which scheme loses least, and whether its SQNR says so in advance.

A sweep that varies the scheme per host (weights in int2..int8, fp4/6/8 or MX formats, per
channel or per group; per-token activations; an 8/4/2-bit KV cache) records per host what
the scheme is, how much noise each quantizer put into what it quantized (SQNR in dB: the
weights layer by layer, the activations and the KV entries as a whole) and what that did to
the model's output on the fidelity text (perplexity, KL to the baseline's next-token
distributions, top-1 agreement). This module turns those rows into

* `design_sqnr`: per scheme its noise and its fidelity, ranked by KL (the ranking of schemes);
* `design_fit`, `design_fit_schemes`: a log-linear law from SQNR to KL and to the loss
  increase, with its error on schemes it was not fitted on, so a reader knows how far a
  cheap SQNR measurement predicts the expensive fidelity pass;
* `design_bits_weight`, `design_bits_act`, `design_bits_kv`: qllm-eval's layout, rows grouped
  by the nominal bits of weights, activations and KV cache, against mean duplicate content
  words (Roy 2023's measure), perplexity and KL;
* a figure of KL against effective SQNR with the fitted line.

A dataset without scheme or fidelity columns (a sweep from before they existed, such as the
Roy 2023 study) gets none of these, so its report is unchanged. Numpy and Polars only: never
imports torch or ray.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from rayq.report.figures import Figure
from rayq.report.tables import Table, baseline, latest_models

# Table keys, in the order the report shows them; a key is absent when its table has nothing to say.
KEYS = (
    "design_sqnr",
    "design_fit",
    "design_fit_schemes",
    "design_bits_weight",
    "design_bits_act",
    "design_bits_kv",
)
# For small noise the logits move by a perturbation whose power is proportional to the noise
# power, and KL is quadratic in that perturbation: KL ∝ 10^(-SQNR/10), so ln KL falls by
# ln(10)/10 per dB. The fit's slope is compared against this.
THEORY_SLOPE = -math.log(10) / 10
MIN_POINTS = 3  # fewer schemes leave a line through two points, whose held-out error means nothing

# The model columns this module reads, with their types: a frame from before they existed
# (or built by hand in a test) gets them as nulls instead of failing.
_MODEL_COLUMNS: dict[str, Any] = {
    "weight_format": pl.String,
    "weight_bits": pl.Float64,
    "act_bits": pl.Int32,
    "kv_bits": pl.Int32,
    "kv_cache": pl.String,
    "act_sqnr_db": pl.Float64,
    "kv_sqnr_db": pl.Float64,
    "fidelity_baseline": pl.String,
    "ppl": pl.Float64,
    "kl_div": pl.Float64,
    "top1_agreement": pl.Float64,
    "fidelity_error": pl.String,
}


def effective_sqnr(sqnrs: list[float]) -> float:
    """The SQNR (dB) of the sum of independent noise sources, each given by its own SQNR.

    Independent noises add in power, so their noise-to-signal ratios add:
    eff = -10 log10(sum_i 10^(-sqnr_i / 10)). An infinite SQNR is a source without noise and
    adds nothing; no noisy source at all is +inf. Each ratio is relative to its own signal
    (weights, activations, KV entries), so the sum treats the model as equally sensitive to
    each: a first-order model, which the fit's held-out error then checks.
    """
    nsr = sum(10.0 ** (-s / 10.0) for s in sqnrs if not math.isinf(s))
    return math.inf if nsr == 0 else -10.0 * math.log10(nsr)


def nominal_weight_bits(weight_format: str | None, weight_bits: float | None) -> int | None:
    """The bits of one weight element as the format is named (int4 g128 -> 4, mxfp4 -> 4, fp32 -> 32).

    Grouped tables need the element width, not the stored bits per weight, which scales
    spread over a group or block (4.25 for int4 g128); without a readable name the stored
    bits rounded down are the best guess, since scales never add a whole bit.
    """
    if weight_format:
        m = re.search(r"(?:mx)?(?:u?int|bf|fp|nf|f)(\d+)", weight_format.lower())
        if m:
            return int(m.group(1))
        m = re.search(r"e(\d)m(\d)", weight_format.lower())
        if m:  # a bare float layout: sign, exponent and mantissa bits
            return 1 + int(m.group(1)) + int(m.group(2))
    if weight_bits is not None and math.isfinite(weight_bits):
        return math.floor(weight_bits + 1e-9)
    return None


@dataclass(frozen=True)
class Scheme:
    """One host (a model in one precision): its scheme, its measured noise and its fidelity."""

    model: str
    precision: str
    baseline: str
    weight_format: str | None
    weight_bits: float | None
    act_bits: int | None
    kv_bits: int | None
    kv_cache: str | None
    w_sqnr_mean: float | None  # over the layers with finite SQNR; None when none is finite or none was measured
    w_sqnr_worst: float | None
    layers_measured: bool
    act_sqnr_db: float | None
    kv_sqnr_db: float | None
    ppl: float | None
    ppl_base: float | None
    kl_div: float | None
    top1_agreement: float | None
    fidelity_error: str | None
    dup_mean: float | None
    n_ok: int

    @property
    def is_baseline(self) -> bool:
        return self.precision == self.baseline

    @property
    def has_fidelity(self) -> bool:
        return self.ppl is not None or self.kl_div is not None

    @property
    def eff_sqnr_db(self) -> float | None:
        """Effective SQNR of the noise sources measured (see `effective_sqnr`).

        None when nothing was measured, rather than +inf: an unmeasured source is not a
        noiseless one. Layers measured all exact (unquantized) with no other source are +inf.
        """
        sources = [s for s in (self.w_sqnr_mean, self.act_sqnr_db, self.kv_sqnr_db) if s is not None]
        if not sources and not self.layers_measured:
            return None
        return effective_sqnr(sources)

    @property
    def d_ppl(self) -> float | None:
        """Relative perplexity change against the baseline of the same model (0 for the baseline)."""
        if self.ppl is None or not self.ppl_base:
            return None
        return self.ppl / self.ppl_base - 1.0

    @property
    def d_loss(self) -> float | None:
        """ln(ppl / ppl_base): the increase in cross-entropy per token, in nats."""
        if self.ppl is None or not self.ppl_base or self.ppl <= 0 or self.ppl_base <= 0:
            return None
        return math.log(self.ppl / self.ppl_base)

    @property
    def w_nominal(self) -> int | None:
        return nominal_weight_bits(self.weight_format, self.weight_bits)

    @property
    def label(self) -> str:
        """qllm-eval's short name: W4, W8A8, W4KV4, W16 for an unquantized model."""
        w = self.w_nominal
        return (
            f"W{w if w is not None else '?'}"
            + (f"A{self.act_bits}" if self.act_bits is not None else "")
            + (f"KV{self.kv_bits}" if self.kv_bits is not None else "")
        )


def _with_columns(df: pl.DataFrame, columns: dict[str, Any]) -> pl.DataFrame:
    missing = [pl.lit(None, dtype=t).alias(c) for c, t in columns.items() if c not in df.columns]
    return df.with_columns(missing) if missing else df


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def schemes(models: pl.DataFrame, layers: pl.DataFrame, completions: pl.DataFrame) -> list[Scheme]:
    """The latest measurement of every host that says something about its scheme or fidelity."""
    if models.height == 0:
        return []
    latest = latest_models(_with_columns(models, _MODEL_COLUMNS))
    informative = pl.any_horizontal(
        pl.col(c).is_not_null() for c in ("weight_format", "weight_bits", "act_bits", "kv_bits", "ppl", "kl_div")
    )
    latest = latest.filter(informative | pl.col("fidelity_error").is_not_null())
    if latest.height == 0:
        return []
    w_stats: dict[tuple[str, str], tuple[float | None, float | None]] = {}
    if layers.height and "sqnr_db" in layers.columns:
        last = layers.filter(pl.col("recorded_at") == pl.col("recorded_at").max().over("model", "precision"))
        agg = last.group_by("model", "precision").agg(
            pl.col("sqnr_db").filter(pl.col("sqnr_db").is_finite()).mean().alias("mean"),
            pl.col("sqnr_db").filter(pl.col("sqnr_db").is_finite()).min().alias("worst"),
        )
        w_stats = {(r["model"], r["precision"]): (r["mean"], r["worst"]) for r in agg.iter_rows(named=True)}
    ok = completions.filter(pl.col("status") == "ok") if completions.height else completions
    dups: dict[tuple[str, str], tuple[float | None, int]] = {}
    if ok.height:
        agg = ok.group_by("model", "precision").agg(
            pl.col("duplicate_content_words").cast(pl.Float64).mean().alias("dup"), pl.len().alias("n")
        )
        dups = {(r["model"], r["precision"]): (r["dup"], r["n"]) for r in agg.iter_rows(named=True)}
    rows = list(latest.iter_rows(named=True))
    ppl_of = {(r["model"], r["precision"]): _finite(r["ppl"]) for r in rows}
    out = []
    for r in rows:
        key = (r["model"], r["precision"])
        base = r["fidelity_baseline"] or baseline(
            [p for (m, p), v in ppl_of.items() if m == r["model"] and v is not None] or [r["precision"]]
        )
        mean, worst = w_stats.get(key, (None, None))
        dup, n_ok = dups.get(key, (None, 0))
        out.append(
            Scheme(
                model=r["model"],
                precision=r["precision"],
                baseline=base,
                weight_format=r["weight_format"],
                weight_bits=_finite(r["weight_bits"]),
                act_bits=r["act_bits"],
                kv_bits=r["kv_bits"],
                kv_cache=r["kv_cache"],
                w_sqnr_mean=_finite(mean),
                w_sqnr_worst=_finite(worst),
                layers_measured=key in w_stats,
                act_sqnr_db=_finite(r["act_sqnr_db"]),
                kv_sqnr_db=_finite(r["kv_sqnr_db"]),
                ppl=_finite(r["ppl"]),
                ppl_base=ppl_of.get((r["model"], base)),
                kl_div=_finite(r["kl_div"]),
                top1_agreement=_finite(r["top1_agreement"]),
                fidelity_error=r["fidelity_error"],
                dup_mean=_finite(dup),
                n_ok=n_ok,
            )
        )
    return out


# -- the law: log(fidelity loss) against SQNR ------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """Ordinary least squares of ln(target) on [1, predictors...], with leave-one-scheme-out predictions.

    `loo[i]` is the prediction for point i from a fit on every other point: the error a
    reader should expect when applying the law to a scheme that was not measured, which the
    in-sample residuals understate (each point pulled the line towards itself).
    """

    target: str
    predictors: tuple[str, ...]
    coef: np.ndarray  # intercept first, then one per predictor
    fitted: np.ndarray  # ln target, in sample
    loo: np.ndarray  # ln target, each predicted without its own point
    observed: np.ndarray  # ln target
    r2: float

    @property
    def n(self) -> int:
        return int(self.observed.size)

    @property
    def mae_in(self) -> float:
        return float(np.mean(np.abs(self.fitted - self.observed)))

    @property
    def mae_loo(self) -> float:
        return float(np.mean(np.abs(self.loo - self.observed)))


def fit_loo(x: np.ndarray, y: np.ndarray, target: str = "", predictors: tuple[str, ...] = ()) -> Fit | None:
    """Fit ln(y) = X b (X: a column of ones, then the columns of x) and predict each point held out.

    None when the design cannot be fitted: fewer points than MIN_POINTS, fewer than one
    more point than parameters (a held-out fit would be underdetermined), or predictors that
    do not vary independently in some held-out set (its line would be arbitrary).
    """
    y = np.asarray(y, dtype=float)
    if y.size < MIN_POINTS or np.any(y <= 0):
        return None
    x = np.asarray(x, dtype=float).reshape(y.size, -1)
    n, p = x.shape[0], x.shape[1] + 1
    if n < p + 1:
        return None
    design = np.column_stack([np.ones(n), x])
    target_ln = np.log(y)
    coef, _, rank, _ = np.linalg.lstsq(design, target_ln, rcond=None)
    if rank < p:
        return None
    loo = np.empty(n)
    for i in range(n):
        keep = np.arange(n) != i
        b, _, rank_i, _ = np.linalg.lstsq(design[keep], target_ln[keep], rcond=None)
        if rank_i < p:
            return None
        loo[i] = design[i] @ b
    fitted = design @ coef
    ss_tot = float(np.sum((target_ln - target_ln.mean()) ** 2))
    r2 = 1.0 - float(np.sum((target_ln - fitted) ** 2)) / ss_tot if ss_tot > 0 else 1.0
    return Fit(target, predictors, coef, fitted, loo, target_ln, r2)


# The two targets: (name in the tables, how to read it from a scheme).
TARGETS: dict[str, Any] = {
    "KL": lambda s: s.kl_div,
    "ln(ppl/ppl_base)": lambda s: s.d_loss,
}


@dataclass(frozen=True)
class Fits:
    """Per target: the points used, the one-predictor fit and the two-predictor one (either may be None)."""

    points: dict[str, list[Scheme]]
    simple: dict[str, Fit | None]
    with_worst: dict[str, Fit | None]
    why: list[str]  # why a target or model has no fit


def fit_all(all_schemes: list[Scheme]) -> Fits:
    """The law, fitted per target over every non-baseline scheme with the numbers it needs.

    The simple model, ln(target) = a + b * effective SQNR, is the one the per-scheme table
    uses: theory gives it (KL ∝ total noise power for small noise, see THEORY_SLOPE), it has
    two parameters for a handful of schemes, and its slope can be checked against -0.230/dB.
    Adding the worst layer's SQNR tests whether one bad layer matters beyond the average;
    it is reported beside the simple model, and it earns its place only if its held-out error
    is lower (in-sample R² always rises with a predictor, so it cannot decide). Points whose
    target is not positive (KL 0, perplexity not above the baseline's) have no logarithm
    and are left out, as is every baseline: its zero loss is the law's limit, not a point on it.
    """
    points: dict[str, list[Scheme]] = {}
    simple: dict[str, Fit | None] = {}
    with_worst: dict[str, Fit | None] = {}
    why: list[str] = []
    for name, get in TARGETS.items():
        pts = []
        for s in all_schemes:
            v, eff = get(s), s.eff_sqnr_db
            if s.is_baseline or v is None or eff is None or not math.isfinite(eff):
                continue
            if v > 0 and math.isfinite(v):
                pts.append(s)
        points[name] = pts
        y = np.array([get(s) for s in pts], dtype=float)
        eff = np.array([s.eff_sqnr_db for s in pts], dtype=float)
        simple[name] = fit_loo(eff, y, name, ("effective SQNR",))
        if simple[name] is None:
            why.append(
                f"{name}: {len(pts)} non-baseline scheme(s) with a positive {name} and a finite effective SQNR; "
                f"a fit with held-out error needs at least {MIN_POINTS} (with distinct SQNRs)"
            )
        # Only schemes with quantized weight layers have a worst layer (a KV-only scheme on fp32 has none):
        # that model is fitted on them, its n says how many.
        sub = [i for i, s in enumerate(pts) if s.w_sqnr_worst is not None]
        worst = np.array([pts[i].w_sqnr_worst for i in sub], dtype=float)
        with_worst[name] = fit_loo(np.column_stack([eff[sub], worst]), y[sub], name, ("effective SQNR", "worst layer"))
        if with_worst[name] is not None and len(sub) < len(pts):
            why.append(f"{name}: the worst-layer model is fitted on the {len(sub)} schemes with quantized layers")
        if simple[name] is not None and with_worst[name] is None:
            why.append(
                f"{name}: no fit with the worst layer (needs {MIN_POINTS + 1}+ schemes, each with layer SQNR, "
                "whose worst layer does not move in step with the effective SQNR)"
            )
    return Fits(points, simple, with_worst, why)


# -- tables -----------------------------------------------------------------------------------


def _sig(x: float | None, digits: int = 4) -> float | str | None:
    """A number to `digits` significant digits, as tables show it (∞ spelled out: it means no noise)."""
    if x is None or math.isnan(x):
        return None
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return float(f"{x:.{digits}g}")


def _r(x: float | None, n: int) -> float | str | None:
    if x is None or math.isnan(x):
        return None
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return round(x, n)


def _rank_key(s: Scheme) -> tuple[str, bool, float, str]:
    return (s.model, s.kl_div is None, s.kl_div if s.kl_div is not None else 0.0, s.precision)


def sqnr_table(all_schemes: list[Scheme]) -> Table:
    """Noise against fidelity per scheme, ranked by KL within each model."""
    measured = sorted((s for s in all_schemes if s.has_fidelity), key=_rank_key)
    rows = []
    rank: dict[str, int] = {}
    for s in measured:
        rank[s.model] = rank.get(s.model, 0) + 1
        rows.append([
            s.model, s.precision, rank[s.model], s.weight_format, _r(s.w_sqnr_mean, 2), _r(s.w_sqnr_worst, 2),
            _r(s.act_sqnr_db, 2), _r(s.kv_sqnr_db, 2), _r(s.eff_sqnr_db, 2), _sig(s.ppl, 5), _sig(s.d_ppl, 4),
            _sig(s.kl_div, 4), _r(s.top1_agreement, 4),
        ])  # fmt: skip
    failed = [f"{s.model}/{s.precision} ({s.fidelity_error})" for s in all_schemes if s.fidelity_error]
    note = (
        "Ranked by KL(baseline ‖ scheme) of next-token distributions on the fidelity text, within each model. "
        "Weight SQNR: mean and worst over the quantized linear layers (finite values; an unquantized layer has "
        "none). Effective SQNR combines the sources measured: noise-to-signal ratios add, "
        "eff = -10 log10(Σ 10^(-SQNR/10)) over weight mean, activations and KV cache; ∞ means no noise. "
        "Δppl = ppl / ppl of the baseline (fidelity_baseline) - 1."
    )
    if not measured:
        note = "No fidelity measured in this sweep (no host has ppl or KL). " + note
    if failed:
        note += " Fidelity failed for: " + "; ".join(failed) + "."
    return Table(
        "Quantization schemes: SQNR against fidelity, ranked by KL",
        ["model", "precision", "rank", "weight format", "W SQNR mean dB", "W SQNR worst dB", "A SQNR dB",
         "KV SQNR dB", "effective SQNR dB", "ppl", "Δppl", "KL", "top-1 agreement"],
        rows,
        note,
    )  # fmt: skip


def _fit_row(f: Fit) -> list[Any]:
    worst = _sig(float(f.coef[2]), 4) if f.coef.size > 2 else None
    return [
        f.target, " + ".join(f.predictors), f.n, _sig(float(f.coef[0]), 4), _sig(float(f.coef[1]), 4), worst,
        _r(f.r2, 3), _r(f.mae_in, 3), _r(f.mae_loo, 3), _r(math.exp(f.mae_loo), 2),
    ]  # fmt: skip


def fit_table(fits: Fits) -> Table:
    rows = []
    for name in TARGETS:
        for f in (fits.simple[name], fits.with_worst[name]):
            if f is not None:
                rows.append(_fit_row(f))
    note = (
        "ln(target) = intercept + slope × SQNR (dB), least squares over non-baseline schemes, pooled across models. "
        "Held-out error: each scheme predicted by a fit on all the others (leave one scheme out); MAE in natural-log "
        "units, and as the typical factor exp(MAE) by which a prediction misses. In-sample error is lower by "
        f"construction. Theory for small noise: slope ≈ {THEORY_SLOPE:.3f} per dB of effective SQNR "
        "(KL ∝ noise power). The per-scheme table uses the effective-SQNR model; the worst-layer model is "
        "better only if its held-out MAE is lower."
    )
    if fits.why:
        note += " " + "; ".join(fits.why) + "."
    return Table(
        "A law from SQNR to fidelity loss, with its held-out error",
        ["target", "predictors", "n", "intercept", "per dB effective SQNR", "per dB worst layer", "R² (in sample)",
         "MAE in sample (ln)", "MAE held out (ln)", "held-out factor ×"],
        rows,
        note,
    )  # fmt: skip


def fit_schemes_table(fits: Fits) -> Table:
    """Each scheme's observed fidelity loss beside the law's prediction made without it."""
    by_key: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = {}
    schemes_by_key: dict[tuple[str, str], Scheme] = {}
    for name in TARGETS:
        f = fits.simple[name]
        if f is None:
            continue
        for s, obs, fit, loo in zip(fits.points[name], f.observed, f.fitted, f.loo, strict=True):
            by_key.setdefault((s.model, s.precision), {})[name] = (math.exp(obs), math.exp(fit), math.exp(loo))
            schemes_by_key[(s.model, s.precision)] = s
    rows = []
    for key in sorted(by_key, key=lambda k: _rank_key(schemes_by_key[k])):
        s, got = schemes_by_key[key], by_key[key]
        row: list[Any] = [s.model, s.precision, _r(s.eff_sqnr_db, 2), _r(s.w_sqnr_worst, 2)]
        for name in TARGETS:
            if name in got:
                obs, fit, loo = got[name]
                row += [_sig(obs), _sig(fit), _sig(loo), _r(obs / loo, 2)]
            else:
                row += [None, None, None, None]
        rows.append(row)
    cols = ["model", "precision", "effective SQNR dB", "W SQNR worst dB"]
    for name in TARGETS:
        cols += [name, f"{name} fitted", f"{name} held out", "observed / held out"]
    return Table(
        "The law per scheme: observed against predicted without the scheme",
        cols,
        rows,
        "Effective-SQNR model. 'held out': predicted by the fit on every other scheme; observed / held out far "
        "from 1 marks a scheme the law does not cover (a sensitive layer, an outlier-heavy activation)."
        + (" " + "; ".join(fits.why) + "." if not rows and fits.why else ""),
    )


def _fid_cells(s: Scheme) -> list[Any]:
    return [s.n_ok, _r(s.dup_mean, 3), _sig(s.ppl, 5), _sig(s.d_ppl, 4), _sig(s.kl_div, 4)]


_FID_COLUMNS = ["ok completions", "mean duplicates", "ppl", "Δppl", "KL"]
_BITS_NOTE = (
    "Nominal bits are the element width the format is named by (int4 g128 → 4; scales not counted); "
    "mean duplicate content words over the host's ok completions; baseline first."
)


def _bits_order(s: Scheme, *bits: int | None) -> tuple[Any, ...]:
    return (s.model, not s.is_baseline, *[-(b if b is not None else 99) for b in bits],
            s.kl_div if s.kl_div is not None else math.inf, s.precision)  # fmt: skip


def bits_tables(all_schemes: list[Scheme]) -> dict[str, Table]:
    """qllm-eval's view: weight-only, weight+activation and KV-cache schemes, grouped by their bits.

    A table whose kind of scheme the sweep never ran is left out. Each keeps its model's
    baseline as the first row, the reference its differences are read against.
    """
    out: dict[str, Table] = {}
    base = [s for s in all_schemes if s.is_baseline]
    weight = [s for s in all_schemes if not s.is_baseline and s.act_bits is None and s.kv_bits is None]
    act = [s for s in all_schemes if not s.is_baseline and s.act_bits is not None]
    kv = [s for s in all_schemes if not s.is_baseline and s.kv_bits is not None]

    def with_base(group: list[Scheme]) -> list[Scheme]:
        models = {s.model for s in group}
        return [s for s in base if s.model in models] + group

    if weight:
        rows = [
            [s.model, s.w_nominal, s.weight_format, s.precision, _r(s.weight_bits, 3), *_fid_cells(s)]
            for s in sorted(with_base(weight), key=lambda s: _bits_order(s, s.w_nominal))
        ]
        out["design_bits_weight"] = Table(
            "Weight-only schemes by weight bits (qllm-eval's W table)",
            ["model", "W bits", "weight format", "precision", "stored bits/weight", *_FID_COLUMNS],
            rows,
            _BITS_NOTE + " Stored bits/weight include the scales.",
        )
    if act:
        rows = [
            [s.model, s.label, s.w_nominal, s.act_bits, s.precision, _r(s.act_sqnr_db, 2), *_fid_cells(s)]
            for s in sorted(with_base(act), key=lambda s: _bits_order(s, s.w_nominal, s.act_bits))
        ]
        out["design_bits_act"] = Table(
            "Weight and activation schemes by W/A bits (qllm-eval's WA table)",
            ["model", "scheme", "W bits", "A bits", "precision", "A SQNR dB", *_FID_COLUMNS],
            rows,
            _BITS_NOTE + " Activations are quantized per token, dynamically.",
        )
    if kv:
        rows = [
            [s.model, s.label, s.kv_bits, s.w_nominal, s.kv_cache, s.precision, _r(s.kv_sqnr_db, 2), *_fid_cells(s)]
            for s in sorted(with_base(kv), key=lambda s: _bits_order(s, s.kv_bits, s.w_nominal))
        ]
        out["design_bits_kv"] = Table(
            "KV-cache schemes by KV bits (qllm-eval's KV table)",
            ["model", "scheme", "KV bits", "W bits", "KV cache", "precision", "KV SQNR dB", *_FID_COLUMNS],
            rows,
            _BITS_NOTE,
        )
    return out


# -- the whole section --------------------------------------------------------------------------


@dataclass(frozen=True)
class DesignSpace:
    """The hosts' schemes and the law fitted on them, computed once for the tables and the figure."""

    schemes: list[Scheme]
    fits: Fits

    def tables(self) -> dict[str, Table]:
        """The design-space tables; {} for a sweep that recorded no scheme and no fidelity."""
        if not self.schemes:
            return {}
        out = {"design_sqnr": sqnr_table(self.schemes)}
        if any(s.has_fidelity for s in self.schemes):
            out["design_fit"] = fit_table(self.fits)
            out["design_fit_schemes"] = fit_schemes_table(self.fits)
        return out | bits_tables(self.schemes)

    def figures(self) -> list[Figure]:
        f = self.fits.simple.get("KL")
        if f is None:
            return []
        return [Figure("design_sqnr_kl", "KL against effective SQNR (line: least-squares law)", _plot(self.fits))]


def analyse(models: pl.DataFrame, layers: pl.DataFrame, completions: pl.DataFrame) -> DesignSpace:
    s = schemes(models, layers, completions)
    return DesignSpace(s, fit_all(s))


def _plot(fits: Fits) -> bytes:
    """KL (log scale) against effective SQNR, one marker per model, each point named by its precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = fits.simple["KL"]
    assert f is not None
    pts = fits.points["KL"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "osD^v<>p*h"
    for i, model in enumerate(sorted({s.model for s in pts})):
        sub = [s for s in pts if s.model == model]
        ax.scatter([s.eff_sqnr_db for s in sub], [s.kl_div for s in sub], marker=markers[i % len(markers)],
                   label=model, zorder=3)  # fmt: skip
        for s in sub:
            ax.annotate(s.precision, (s.eff_sqnr_db or 0.0, s.kl_div or 0.0), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    xs = np.linspace(min(s.eff_sqnr_db or 0.0 for s in pts), max(s.eff_sqnr_db or 0.0 for s in pts), 50)
    ax.plot(xs, np.exp(f.coef[0] + f.coef[1] * xs), ls="--", lw=1, color="k",
            label=f"ln KL = {f.coef[0]:.2f} {f.coef[1]:+.3f}·SQNR (held-out ×{math.exp(f.mae_loo):.2f})")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("effective SQNR (dB)")
    ax.set_ylabel("KL(baseline ‖ scheme), nats")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()

"""The eight findings of Roy 2023, each turned into statistics with a claimed range.

Each finding is tested per model. A part is *supported* when its whole 95% bootstrap
interval lies in the range the paper claims, *contradicted* when none of it does, and
*inconclusive* otherwise; a finding combines its parts (see stats.combine). Ranges follow
the paper's wording; where it gives no number ("alike", "a little", "barely") the range
used is stated next to the verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from rayq.report.stats import Bootstrap, Estimate, combine, verdict

INF = math.inf
EPS = 1e-12
NF4, NF4DQ, FP4, FP4DQ, INT8, BF16 = "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq", "bnb-int8", "bf16"
FOUR_BIT = (NF4, NF4DQ, FP4, FP4DQ)


@dataclass(frozen=True)
class Part:
    name: str
    estimate: Estimate
    low: float
    high: float
    note: str = ""

    @property
    def verdict(self) -> str:
        return verdict(self.estimate, self.low, self.high)


@dataclass(frozen=True)
class Finding:
    number: int
    claim: str
    model: str
    parts: list[Part] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return combine([p.verdict for p in self.parts])


@dataclass
class ModelData:
    """One model's completions (status ok) and memory footprints, with its bootstrap."""

    model: str
    rows: pl.DataFrame
    speed_rows: pl.DataFrame  # rows whose tokens/s are comparable (serial protocol when present)
    memory: dict[str, float]
    boot: Bootstrap

    def has(self, *precisions: str) -> bool:
        present = set(self.rows["precision"].unique().to_list())
        return all(p in present for p in precisions)

    def mean(self, col: str, *precisions: str, where: pl.Expr | None = None) -> np.ndarray:
        src = self.speed_rows if col == "tokens_per_s" else self.rows
        df = src.filter(pl.col("precision").is_in(list(precisions)))
        if where is not None:
            df = df.filter(where)
        return self.boot.mean(df, col)

    def mem(self, *precisions: str) -> float:
        vals = [self.memory.get(p, math.nan) for p in precisions]
        return float(sum(vals))


def _est(samples: np.ndarray) -> Estimate:
    return Estimate.from_samples(samples)


def _missing(name: str, needs: tuple[str, ...], low: float, high: float) -> Part:
    return Part(name, Estimate(math.nan, math.nan, math.nan), low, high, f"needs precisions {', '.join(needs)}")


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a - b) / b


def _cut(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - np.asarray(a, dtype=float) / np.asarray(b, dtype=float)


def f1(d: ModelData) -> list[Part]:
    if not d.has(NF4, FP4):
        return [_missing("fp4 vs nf4", (NF4, FP4), -0.1, 0.1)]
    return [
        Part(
            "duplicates, fp4 vs nf4 (relative)",
            _est(_rel(d.mean("duplicate_content_words", FP4), d.mean("duplicate_content_words", NF4))),
            -0.10,
            0.10,
            "alike taken as within ±10%",
        ),
        Part(
            "tokens/s, fp4 vs nf4 (relative)",
            _est(_rel(d.mean("tokens_per_s", FP4), d.mean("tokens_per_s", NF4))),
            -0.10,
            0.10,
            "alike taken as within ±10%",
        ),
        Part(
            "memory, fp4 vs nf4 (relative)",
            Estimate.exact(float(_rel(np.array(d.mem(FP4)), np.array(d.mem(NF4))))),
            -0.05,
            0.05,
            "alike taken as within ±5%",
        ),
    ]


def f2(d: ModelData) -> list[Part]:
    if not d.has(INT8, BF16):
        return [_missing("int8 vs bf16", (INT8, BF16), 0.4, 0.5)]
    return [
        Part("memory cut, int8 vs bf16", Estimate.exact(float(_cut(d.mem(INT8), d.mem(BF16)))), 0.40, 0.50),
        Part(
            "slowdown, int8 vs bf16", _est(_cut(d.mean("tokens_per_s", INT8), d.mean("tokens_per_s", BF16))), 0.75, 0.80
        ),
        Part(
            "fewer content words, int8 vs bf16",
            _est(_cut(d.mean("content_words", INT8), d.mean("content_words", BF16))),
            0.30,
            0.50,
        ),
    ]


def f3(d: ModelData) -> list[Part]:
    pairs = [(a, b) for a, b in ((NF4, NF4DQ), (FP4, FP4DQ)) if d.has(a, b)]
    if not pairs:
        return [_missing("double quantization", (NF4, NF4DQ), EPS, 0.10)]
    plain, dq = [a for a, _ in pairs], [b for _, b in pairs]
    return [
        Part(
            "memory saved by double quantization",
            Estimate.exact(float(_cut(d.mem(*dq), d.mem(*plain)))),
            EPS,
            0.10,
            "a little taken as 0-10%; footprints from get_memory_footprint, which misses scales",
        ),
        Part(
            "speed cost of double quantization",
            _est(_cut(d.mean("tokens_per_s", *dq), d.mean("tokens_per_s", *plain))),
            0.10,
            0.25,
        ),
    ]


def _temperature_effect(d: ModelData, precisions: tuple[str, ...], t_range: tuple[float, float] | None) -> np.ndarray:
    """Change in duplicates across the temperature range, relative to their mean."""
    df = d.rows.filter(pl.col("precision").is_in(list(precisions)))
    if t_range is not None:
        df = df.filter(pl.col("temperature").is_between(*t_range))
    temps = df["temperature"].unique()
    if temps.len() < 2:
        return np.full(d.boot.weights.shape[0], math.nan)
    span = float(temps.max()) - float(temps.min())  # type: ignore[arg-type]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (
            d.boot.slope(df, "temperature", "duplicate_content_words")
            * span
            / d.boot.mean(df, "duplicate_content_words")
        )


def f4(d: ModelData) -> list[Part]:
    others = [p for p in d.rows["precision"].unique().to_list() if p != BF16]
    if not d.has(BF16) or not others:
        return [_missing("bf16 vs the others", (BF16, "another precision"), 1.0, INF)]
    fastest_other = np.nanmax(np.vstack([d.mean("tokens_per_s", p) for p in others]), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        speed = d.mean("tokens_per_s", BF16) / fastest_other
    return [
        Part("bf16 tokens/s over the fastest other precision", _est(speed), 1.0, INF),
        Part(
            "bf16 duplicates: change across temperatures (relative)",
            _est(_temperature_effect(d, (BF16,), None)),
            -0.10,
            0.10,
            "barely taken as within ±10% of the mean",
        ),
    ]


def f5(d: ModelData) -> list[Part]:
    four = tuple(p for p in FOUR_BIT if d.has(p))
    if not four or not d.has(BF16):
        return [_missing("4-bit vs bf16 temperature sensitivity", (BF16, NF4), EPS, INF)]
    window = (0.5, 0.8)
    in_window = d.rows.filter(pl.col("temperature").is_between(*window))["temperature"].n_unique()
    t_range = window if in_window >= 2 else None
    diff = np.abs(_temperature_effect(d, four, t_range)) - np.abs(_temperature_effect(d, (BF16,), t_range))
    note = "temperatures 0.5-0.8" if t_range else "all temperatures (fewer than two in 0.5-0.8)"
    return [Part("|4-bit temperature effect| - |bf16 temperature effect|", _est(diff), EPS, INF, note)]


def _bucket_r2(d: ModelData, df: pl.DataFrame) -> np.ndarray:
    """R^2 of a line through the mean duplicates of each max_returned_tokens value, per sample."""
    xs = sorted(df["max_returned_tokens"].unique().to_list())
    means = np.vstack(
        [d.boot.mean(df.filter(pl.col("max_returned_tokens") == x), "duplicate_content_words") for x in xs]
    )
    x = np.asarray(xs, dtype=float)
    out = np.full(means.shape[1], math.nan)
    for j in range(means.shape[1]):
        y = means[:, j]
        ok = np.isfinite(y)
        if ok.sum() >= 3:
            slope, intercept = np.polyfit(x[ok], y[ok], 1)
            ss_res = float(np.sum((y[ok] - (slope * x[ok] + intercept)) ** 2))
            ss_tot = float(np.sum((y[ok] - y[ok].mean()) ** 2))
            out[j] = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return out


def f6(d: ModelData) -> list[Part]:
    df = d.rows
    parts = [
        Part(
            "slope of duplicates on max returned tokens",
            _est(d.boot.slope(df, "max_returned_tokens", "duplicate_content_words")),
            EPS,
            INF,
        )
    ]
    if df["max_returned_tokens"].n_unique() < 3:
        parts.append(_missing("linearity (R² of per-length means)", ("three or more max_new_tokens",), 0.9, 1.0))
    else:
        parts.append(
            Part(
                "linearity: R² of a line through per-length means",
                _est(_bucket_r2(d, df)),
                0.9,
                1.0,
                "linear taken as R² ≥ 0.9",
            )
        )
    return parts


def f7(d: ModelData) -> list[Part]:
    ks = sorted(d.rows["top_k"].unique().to_list())
    high = [k for k in ks if k >= 5]
    if 1 not in ks or len(high) < 2:
        return [_missing("top_k effect", ("top_k 1 and two or more top_k >= 5",), -INF, -EPS)]
    by_k = {k: d.boot.mean(d.rows.filter(pl.col("top_k") == k), "duplicate_content_words") for k in ks}
    lowest_other = np.nanmin(np.vstack([by_k[k] for k in ks if k != 1]), axis=0)
    sat = np.vstack([by_k[k] for k in high])
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = (np.nanmax(sat, axis=0) - np.nanmin(sat, axis=0)) / np.nanmean(sat, axis=0)
    return [
        Part("duplicates at top_k=1 minus the lowest other top_k", _est(by_k[1] - lowest_other), -INF, -EPS),
        Part(
            "spread of duplicates over top_k >= 5 (relative)", _est(spread), 0.0, 0.10, "saturates taken as within 10%"
        ),
    ]


def f8(d: ModelData) -> list[Part]:
    fp = tuple(p for p in (FP4, FP4DQ) if d.has(p))
    nf = tuple(p for p in (NF4, NF4DQ) if d.has(p))
    if not fp or not nf:
        return [_missing("fp4 vs nf4 repetition", (FP4, NF4), 0.12, 0.20)]
    stat = _est(_cut(d.mean("duplicate_content_words", *fp), d.mean("duplicate_content_words", *nf)))
    if "llama2" in d.model.replace("-", "").replace("_", "").lower():
        # nf4 repeats 9-11% less: dup_nf4 = (0.89..0.91) dup_fp4, so 1 - dup_fp4/dup_nf4 in [1-1/0.89, 1-1/0.91]
        return [
            Part(
                "fp4 family repeats less than nf4 family (1 - fp4/nf4), llama2 exception",
                stat,
                1 - 1 / 0.89,
                1 - 1 / 0.91,
                "llama2: nf4 repeats 9-11% less",
            )
        ]
    return [Part("fp4 family repeats less than nf4 family (1 - fp4/nf4)", stat, 0.12, 0.20)]


CLAIMS: list[tuple[int, str, Callable[[ModelData], list[Part]]]] = [
    (1, "nf4 and fp4 are alike in speed, memory and quality.", f1),
    (2, "int8 cuts memory 40-50% vs bf16 but is 75-80% slower; it produces 30-50% fewer content words.", f2),
    (3, "Double quantization saves a little memory and costs 10-25% speed.", f3),
    (4, "bf16 is fastest for every size; its duplicate counts barely depend on temperature.", f4),
    (5, "4-bit models are more sensitive to temperature (notably 0.5 to 0.8) than bf16.", f5),
    (6, "Duplicate words grow linearly with max returned tokens.", f6),
    (7, "top_k = 1 gives the fewest duplicates; the effect saturates at top_k >= 5.", f7),
    (8, "fp4/fp4-dq repeat 12-20% less than nf4/nf4-dq except on llama2, where nf4 repeats 9-11% less.", f8),
]


def model_data(completions: pl.DataFrame, memory: dict[tuple[str, str], float], model: str, n_boot: int) -> ModelData:
    rows = completions.filter((pl.col("model") == model) & (pl.col("status") == "ok"))
    serial = rows.filter(pl.col("protocol") == "serial")
    mem = {p: v for (m, p), v in memory.items() if m == model}
    return ModelData(model, rows, serial if serial.height else rows, mem, Bootstrap(rows, n_boot))


def evaluate(completions: pl.DataFrame, memory: dict[tuple[str, str], float], n_boot: int = 1000) -> list[Finding]:
    out = []
    for model in sorted(completions["model"].unique().to_list()):
        d = model_data(completions, memory, model, n_boot)
        if d.rows.height == 0:
            continue
        for number, claim, fn in CLAIMS:
            out.append(Finding(number, claim, model, fn(d)))
    return out

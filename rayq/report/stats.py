"""Bootstrap confidence intervals over prompts and seeds, and verdicts against a claimed range.

The paper reports single numbers from one sample per cell. Here the unit of resampling is a
(prompt, seed) pair: every completion of that pair, across the whole grid, moves together,
so the interval reflects how much a conclusion depends on which prompts and samples were
drawn. All statistics are computed from per-unit sums, so one weight matrix (B resamples x
units) serves every statistic and a bootstrap costs a matrix product, not B group-bys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

UNIT = ("prompt_id", "seed")
SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE = "supported", "contradicted", "inconclusive", "not testable"


@dataclass(frozen=True)
class Estimate:
    """A statistic's point value and its bootstrap interval (all three NaN when undefined)."""

    point: float
    low: float
    high: float

    @classmethod
    def from_samples(cls, samples: np.ndarray, level: float = 0.95) -> Estimate:
        point = float(samples[0])
        rest = samples[1:][np.isfinite(samples[1:])]
        if not math.isfinite(point) or rest.size == 0:
            return cls(point, math.nan, math.nan)
        a = (1 - level) / 2
        return cls(point, float(np.quantile(rest, a)), float(np.quantile(rest, 1 - a)))

    @classmethod
    def exact(cls, value: float) -> Estimate:
        return cls(value, value, value)


def verdict(est: Estimate, low: float, high: float) -> str:
    """Supported: the whole interval lies in the claimed range; contradicted: none of it does."""
    if not (math.isfinite(est.low) and math.isfinite(est.high)):
        return NOT_TESTABLE
    if est.low >= low and est.high <= high:
        return SUPPORTED
    if est.high < low or est.low > high:
        return CONTRADICTED
    return INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    """A claim of several parts holds if every part does, and fails if any part fails."""
    if not verdicts or NOT_TESTABLE in verdicts:
        return NOT_TESTABLE
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return INCONCLUSIVE


class Bootstrap:
    """Resampling weights over the (prompt, seed) units of one data frame.

    Row 0 of every sample vector is the point estimate (all weights 1); rows 1..B are the
    resamples.
    """

    def __init__(self, df: pl.DataFrame, n_boot: int = 1000, seed: int = 0) -> None:
        units = df.select(UNIT).unique().sort(UNIT)
        self.units = units.with_row_index("_unit")
        n = units.height
        rng = np.random.default_rng(seed)
        boot = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) if n else np.zeros((n_boot, 0))
        self.weights = np.vstack([np.ones((1, n)), boot]).astype(np.float64)  # (B+1) x U
        self.n_units = n

    def _per_unit(self, df: pl.DataFrame, exprs: dict[str, pl.Expr]) -> dict[str, np.ndarray]:
        # Columns first, sums second: a literal summed inside a group-by would count once per group.
        cols = df.join(self.units, on=list(UNIT), how="inner").select("_unit", **exprs)
        agg = cols.group_by("_unit").agg(pl.col(k).sum() for k in exprs)
        out = {}
        for k in exprs:
            v = np.zeros(self.n_units)
            v[agg["_unit"].to_numpy()] = agg[k].cast(pl.Float64).to_numpy()
            out[k] = v
        return out

    def totals(self, df: pl.DataFrame, exprs: dict[str, pl.Expr]) -> dict[str, np.ndarray]:
        """Weighted sums of each expression: one value per bootstrap sample."""
        return {k: self.weights @ v for k, v in self._per_unit(df, exprs).items()}

    def mean(self, df: pl.DataFrame, col: str) -> np.ndarray:
        t = self.totals(df, {"s": pl.col(col), "n": pl.lit(1.0)})
        with np.errstate(invalid="ignore", divide="ignore"):
            return t["s"] / t["n"]

    def slope(self, df: pl.DataFrame, x: str, y: str) -> np.ndarray:
        """Least-squares slope of y on x, from weighted sums of n, x, y, xy, xx."""
        t = self.totals(
            df,
            {
                "n": pl.lit(1.0),
                "x": pl.col(x).cast(pl.Float64),
                "y": pl.col(y).cast(pl.Float64),
                "xy": pl.col(x).cast(pl.Float64) * pl.col(y),
                "xx": pl.col(x).cast(pl.Float64) ** 2,
            },
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = t["xy"] - t["x"] * t["y"] / t["n"]
            var = t["xx"] - t["x"] ** 2 / t["n"]
            return cov / var


def linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Slope, intercept and R^2 of an ordinary least-squares line (NaN when x is constant)."""
    if len(x) < 2 or float(np.var(x)) == 0.0:
        return math.nan, math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return float(slope), float(intercept), r2

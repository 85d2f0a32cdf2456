"""The paper's figures: duplicate content words against temperature, max returned tokens and top_k.

One panel per model, one line per precision; PNG bytes, so the report can embed them and
open without a network.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import polars as pl

from rayq.report.stats import linear_fit


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    png: bytes


def _panels(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def _plot(
    df: pl.DataFrame, x: str, title: str, xlabel: str, fit: bool = False, logx: bool = False, by: str | None = None
) -> bytes:
    """Mean duplicates per value of `by` (default `x`), placed at the mean of `x` in that group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted(df["model"].unique().to_list())
    rows, cols = _panels(max(1, len(models)))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(models) :]:
        ax.set_visible(False)
    for ax, model in zip(axes.flat, models, strict=False):
        sub = df.filter(pl.col("model") == model)
        for precision in sorted(sub["precision"].unique().to_list()):
            pts = (
                sub.filter(pl.col("precision") == precision)
                .group_by(by or x)
                .agg(*([pl.col(x).mean()] if by else []), pl.col("duplicate_content_words").mean().alias("y"))
                .sort(x)
            )
            xs, ys = pts[x].cast(pl.Float64).to_numpy(), pts["y"].to_numpy()
            (line,) = ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=precision)
            if fit and len(xs) >= 2:
                slope, intercept, _ = linear_fit(xs, ys)
                ax.plot(xs, slope * xs + intercept, ls="--", lw=0.8, color=line.get_color())
        if logx:
            ax.set_xscale("log")
        ax.set_title(model, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean duplicate content words")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def all_figures(completions: pl.DataFrame) -> list[Figure]:
    ok = completions.filter(pl.col("status") == "ok")
    return [
        Figure("temperature", "Duplicates against temperature",
               _plot(ok, "temperature", "Duplicate content words against temperature", "temperature")),
        Figure("max_returned_tokens", "Duplicates against max returned tokens (dashed: linear fit)",
               _plot(ok, "max_returned_tokens", "Duplicate content words against max returned tokens",
                     "max returned tokens (mean per max_new_tokens)", fit=True, by="max_new_tokens")),
        Figure("top_k", "Duplicates against top_k",
               _plot(ok, "top_k", "Duplicate content words against top_k", "top_k (log scale)", logx=True)),
    ]  # fmt: skip

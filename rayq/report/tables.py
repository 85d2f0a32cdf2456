"""The report's tables: the paper's Tables 6 and 7 beside the published figures, the slopes of
duplicates on length, the overall comparison between precisions, and the failures."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import polars as pl

from rayq.report.stats import Bootstrap, Estimate, linear_fit
from rayq.store.divergence import first_divergence

# rayq precision name -> the paper's column name
PAPER_PRECISION = {
    "bnb-nf4": "bnb.nf4",
    "bnb-nf4-dq": "bnb.nf4-dq",
    "bnb-fp4": "bnb.fp4",
    "bnb-fp4-dq": "bnb.fp4-dq",
    "bnb-int8": "bnb.int8",
    "bf16": "bfloat16",
}
GB = 1e9  # the paper's memory unit, taken as 10^9 bytes


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


def _reference(name: str) -> list[dict[str, str]]:
    text = resources.files("rayq.catalog").joinpath("roy2023", name).read_text()
    return list(csv.DictReader(text.splitlines()))


def published_memory() -> dict[tuple[str, str], float]:
    out = {}
    for r in _reference("memory_gb.csv"):
        for col, val in r.items():
            if col != "model" and val:
                out[(r["model"], col)] = float(val)
    return out


def published_speed() -> dict[tuple[str, str], tuple[float, float]]:
    return {
        (r["model"], r["quant"]): (float(r["min_tok_s"]), float(r["max_tok_s"]))
        for r in _reference("tokens_per_sec.csv")
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def latest_models(models: pl.DataFrame) -> pl.DataFrame:
    """The most recent measurement of each (model, precision)."""
    if models.height == 0:
        return models
    return models.sort("recorded_at").group_by("model", "precision").last().sort("model", "precision")


def memory_by_pair(models: pl.DataFrame) -> dict[tuple[str, str], float]:
    m = latest_models(models).filter(pl.col("footprint_bytes").is_not_null())
    return {(r["model"], r["precision"]): r["footprint_bytes"] / GB for r in m.iter_rows(named=True)}


def memory_table(models: pl.DataFrame) -> Table:
    pub = published_memory()
    latest = {(r["model"], r["precision"]): r for r in latest_models(models).iter_rows(named=True)}
    rows = []
    for (model, precision), gb in sorted(memory_by_pair(models).items()):
        ref = pub.get((model, PAPER_PRECISION.get(precision, "")))
        est = latest[(model, precision)].get("estimated_bytes")
        est_gb = est / GB if est is not None else None
        rows.append(
            [
                model,
                precision,
                round(gb, 4),
                ref,
                _round(_ratio(gb, ref), 3),
                _round(est_gb, 4),
                _round(_ratio(est_gb, gb), 3),
            ]
        )
    return Table(
        "Memory footprint (the paper's Table 6)",
        [
            "model",
            "precision",
            "footprint GB",
            "published GB",
            "ratio",
            "placement estimate GB",
            "estimate / footprint",
        ],
        rows,
        "footprint = transformers' get_memory_footprint() / 10^9 (it misses bitsandbytes' double-quantization "
        "scales); published figures where model and precision names match the paper's. The placement estimate "
        "(rayq.planning.estimate) adds the KV cache, activations and load peak to the weights, so it should stay above "
        "the footprint; it is empty for rows written before rayq recorded it.",
    )


def speed_rows(completions: pl.DataFrame) -> tuple[pl.DataFrame, str]:
    ok = completions.filter(pl.col("status") == "ok")
    serial = ok.filter(pl.col("protocol") == "serial")
    if serial.height:
        return serial, "serial protocol rows (the paper's one-at-a-time timing)"
    return (
        ok,
        "no serial-protocol rows: batched rows, tokens/s as each row experienced it (not comparable to the paper)",
    )


def speed_table(completions: pl.DataFrame) -> Table:
    rows_df, source = speed_rows(completions)
    pub = published_speed()
    agg = (
        rows_df.group_by("model", "precision")
        .agg(pl.col("tokens_per_s").min().alias("min"), pl.col("tokens_per_s").max().alias("max"), pl.len().alias("n"))
        .sort("model", "precision")
    )
    rows = []
    for r in agg.iter_rows(named=True):
        ref = pub.get((r["model"], PAPER_PRECISION.get(r["precision"], "")))
        rows.append([
            r["model"], r["precision"], r["n"], _round(r["min"], 2), _round(r["max"], 2),
            ref[0] if ref else None, ref[1] if ref else None,
            _round(_ratio(r["min"], ref[0] if ref else None), 3), _round(_ratio(r["max"], ref[1] if ref else None), 3),
        ])  # fmt: skip
    return Table(
        "Tokens per second, min and max (the paper's Table 7)",
        [
            "model",
            "precision",
            "rows",
            "min tok/s",
            "max tok/s",
            "published min",
            "published max",
            "min ratio",
            "max ratio",
        ],
        rows,
        f"tokens/s from {source}.",
    )


def slope_table(completions: pl.DataFrame, n_boot: int = 1000) -> Table:
    ok = completions.filter(pl.col("status") == "ok")
    rows = []
    for (model, precision), df in sorted(ok.group_by("model", "precision"), key=lambda kv: kv[0]):  # type: ignore[arg-type,return-value]
        slope, intercept, r2 = linear_fit(
            df["max_returned_tokens"].cast(pl.Float64).to_numpy(),
            df["duplicate_content_words"].cast(pl.Float64).to_numpy(),
        )
        est = Estimate.from_samples(Bootstrap(df, n_boot).slope(df, "max_returned_tokens", "duplicate_content_words"))
        rows.append([model, precision, df.height, _round(slope, 4), _ci(est, 4), _round(intercept, 3), _round(r2, 3)])
    return Table(
        "Duplicate content words against max returned tokens: linear fit per precision",
        ["model", "precision", "rows", "slope (dup/token)", "95% CI", "intercept", "R² (rows)"],
        rows,
        "Least squares over completions; the interval resamples (prompt, seed) pairs.",
    )


def baseline(precisions: list[str]) -> str:
    for p in ("bf16", "fp32", "fp16"):
        if p in precisions:
            return p
    return sorted(precisions)[0]


def comparison_table(completions: pl.DataFrame, n_boot: int = 1000) -> Table:
    ok = completions.filter(pl.col("status") == "ok")
    rows = []
    for model in sorted(ok["model"].unique().to_list()):
        df = ok.filter(pl.col("model") == model)
        precisions = sorted(df["precision"].unique().to_list())
        base = baseline(precisions)
        boot = Bootstrap(df, n_boot)
        stats = {}
        for col in ("duplicate_content_words", "content_words"):
            b = boot.mean(df.filter(pl.col("precision") == base), col)
            for p in precisions:
                if p != base:
                    with_p = boot.mean(df.filter(pl.col("precision") == p), col)
                    with np.errstate(invalid="ignore", divide="ignore"):  # a zero baseline mean has no ratio
                        stats[(p, col)] = Estimate.from_samples((with_p - b) / b)
        for p in precisions:
            if p == base:
                continue
            d, c = stats[(p, "duplicate_content_words")], stats[(p, "content_words")]
            rows.append([model, p, base, _pct(d.point), _ci(d, pct=True), _pct(c.point), _ci(c, pct=True)])
    return Table(
        "Overall comparison between precisions (the paper's section 4.5)",
        ["model", "precision", "vs", "duplicates Δ", "95% CI", "content words Δ", "95% CI"],
        rows,
        "Relative difference of the mean over all completions against the baseline precision (bf16, else fp32).",
    )


def failure_table(completions: pl.DataFrame) -> Table:
    agg = (
        completions.group_by("model", "precision")
        .agg(
            pl.len().alias("rows"),
            (pl.col("status") == "ok").sum().alias("ok"),
            (pl.col("status") == "error").sum().alias("error"),
            (pl.col("status") == "oom").sum().alias("oom"),
        )
        .sort("model", "precision")
    )
    return Table("Rows by status", agg.columns, [list(r) for r in agg.iter_rows()])


def _round(x: float | None, n: int) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(x, n)


def _pct(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{100 * x:+.1f}%"


def _ci(e: Estimate, n: int = 3, pct: bool = False) -> str:
    if not (math.isfinite(e.low) and math.isfinite(e.high)):
        return "–"
    if pct:
        return f"[{100 * e.low:+.1f}%, {100 * e.high:+.1f}%]"
    return f"[{e.low:.{n}f}, {e.high:.{n}f}]"


def divergence_table(models: pl.DataFrame) -> Table:
    """First token where each precision's greedy reference leaves the baseline's."""

    latest = latest_models(models).filter(pl.col("reference_tokens").is_not_null())
    rows = []
    for model in sorted(latest["model"].unique().to_list()):
        sub = {r["precision"]: r for r in latest.filter(pl.col("model") == model).iter_rows(named=True)}
        base = baseline(list(sub))
        for p, r in sorted(sub.items()):
            if p == base:
                continue
            d = first_divergence(sub[base]["reference_tokens"], r["reference_tokens"])
            rows.append([model, p, base, "identical" if d is None else d, r["reference_text"]])
    return Table(
        "Greedy reference continuation: first divergence from the baseline",
        ["model", "precision", "vs", "first differing token", "continuation"],
        rows,
        "32 greedy tokens after 'Life in London'; position 0 is the first generated token.",
    )


def sqnr_table(layers: pl.DataFrame) -> Table:
    """Mean weight SQNR per layer group, like the paper's Table 3 groups GPTQ's layer error."""
    if layers.height == 0:
        return Table("Weight SQNR per layer group (dB)", ["model", "precision"], [], "no layer measurements")
    latest = layers.filter(pl.col("recorded_at") == pl.col("recorded_at").max().over("model", "precision"))
    kinds = ["mlp.proj", "att.proj", "mlp.fc", "attn.attn"]
    agg = (
        latest.filter(pl.col("kind").is_in(kinds) & pl.col("sqnr_db").is_finite())
        .group_by("model", "precision", "kind")
        .agg(pl.col("sqnr_db").mean())
    )
    rows = []
    for (model, precision), sub in sorted(agg.group_by("model", "precision"), key=lambda kv: kv[0]):  # type: ignore[arg-type,return-value]
        by_kind = dict(zip(sub["kind"], sub["sqnr_db"], strict=True))
        rows.append([model, precision, *[_round(by_kind.get(k), 1) for k in kinds]])
    return Table(
        "Weight SQNR per layer group (dB), the paper's Table 3 groups",
        ["model", "precision", *kinds],
        rows,
        "10 log10(|W|^2 / |W - dequant(W)|^2) against the unquantized weights, averaged over the layers of a group; "
        "higher is closer. Unquantized fp32 layers (infinite SQNR) are left out.",
    )


def gptq_table(models: pl.DataFrame, layers: pl.DataFrame) -> Table:
    """GPTQ's cost (the paper's Table 2) and its own per-layer loss by group (Table 3)."""
    kinds = ["mlp.proj", "att.proj", "mlp.fc", "attn.attn"]
    paid = models.filter(pl.col("quantize_s").is_not_null()) if "quantize_s" in models.columns else models.head(0)
    loss = (
        layers.filter(pl.col("quant_error").is_not_null() & pl.col("kind").is_in(kinds))
        .group_by("model", "precision", "kind")
        .agg(pl.col("quant_error").sum())
        if layers.height and "quant_error" in layers.columns
        else pl.DataFrame(
            schema={"model": pl.String, "precision": pl.String, "kind": pl.String, "quant_error": pl.Float64}
        )
    )
    keys = sorted({(r["model"], r["precision"]) for r in paid.iter_rows(named=True)}
                  | {(r["model"], r["precision"]) for r in loss.iter_rows(named=True)})  # fmt: skip
    rows = []
    for model, precision in keys:
        cost = paid.filter((pl.col("model") == model) & (pl.col("precision") == precision)).sort("recorded_at")
        c = cost.row(-1, named=True) if cost.height else {}
        by_kind = {
            r["kind"]: r["quant_error"]
            for r in loss.filter((pl.col("model") == model) & (pl.col("precision") == precision)).iter_rows(named=True)
        }
        rows.append([model, precision, _round(c.get("quantize_s"), 1), _round(c.get("quantize_peak_mb"), 0),
                     *[_round(by_kind.get(k), 6) for k in kinds]])  # fmt: skip
    return Table(
        "GPTQ: quantization cost (the paper's Table 2) and per-layer loss by group (Table 3)",
        ["model", "precision", "quantize s", "peak MiB", *[f"loss {k}" for k in kinds]],
        rows,
        "Cost from the host that quantized (later hosts load the cached checkpoint); loss is GPTQModel's own "
        "per-layer loss summed over the layers of a group. The paper's figures are on GPUs, for 3B-13B models.",
    )

"""From a finished (or running) sweep to a self-contained HTML report and its Markdown twin.

Sections: the run, rows by status, memory (Table 6) and tokens/s (Table 7) beside the
published figures, the paper's three figures, the slopes of duplicates on length, the
overall comparison between precisions, and the eight findings with bootstrap intervals and
verdicts. Never imports ray or torch.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from rayq.errors import RayqError
from rayq.report import design_space, figures, findings, tables
from rayq.report.document import Report
from rayq.report.render import render_html, render_markdown


class ReportError(RayqError, ValueError):
    """Results a report cannot be made of, or written as asked (a ValueError too, as it was)."""


def build(root: str | Path, n_boot: int = 1000) -> Report:
    from rayq.store import manifest
    from rayq.store.query import open as open_dataset
    from rayq.store.storage import Storage

    data = open_dataset(root)
    completions = data.completions.collect()
    models = data.models.collect()
    layers = data.layers.collect()
    if completions.height == 0:
        raise ReportError(f"{root}: no completions to report on")
    run = manifest.load(Storage.at(root))
    memory = tables.memory_by_pair(models)
    ok = completions.filter(pl.col("status") == "ok")
    design = design_space.analyse(models, layers, completions)
    return Report(
        manifest=run,
        tables={
            "status": tables.failure_table(completions),
            "memory": tables.memory_table(models),
            "speed": tables.speed_table(completions),
            "slopes": tables.slope_table(completions, n_boot),
            "comparison": tables.comparison_table(completions, n_boot),
            "divergence": tables.divergence_table(models),
            "sqnr": tables.sqnr_table(layers),
            "gptq": tables.gptq_table(models, layers),
            **design.tables(),  # the scheme design space; absent for sweeps without scheme or fidelity columns
        },
        figures=figures.all_figures(ok) + design.figures(),
        findings=findings.evaluate(completions, memory, n_boot),
    )


def write(root: str | Path, out: str | Path | None = None, n_boot: int = 1000) -> tuple[Path, Path]:
    """Write DIR/report.html (or `out`) and a Markdown twin beside it; returns both paths.

    The report is local files: for results on object storage (`root` a URI) `out` is required.
    """
    from rayq.store.storage import is_uri

    if out is None and is_uri(root):
        raise ReportError(f"{root}: a report is written to local files only; give it a local file to write")
    report = build(root, n_boot)
    html_path = Path(out) if out else Path(root) / "report.html"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(report), encoding="utf-8")
    md_path = html_path.with_suffix(".md")
    fig_dir = html_path.parent / f"{html_path.stem}_files"
    fig_dir.mkdir(exist_ok=True)
    for f in report.figures:
        (fig_dir / f"{f.key}.png").write_bytes(f.png)
    md_path.write_text(render_markdown(report, fig_dir.name), encoding="utf-8")
    return html_path, md_path

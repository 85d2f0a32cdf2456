"""HTML (self-contained: figures as data URIs, inline CSS, no script, no network) and Markdown."""

from __future__ import annotations

import base64
import html
import math
from typing import TYPE_CHECKING, Any

from rayq.report.design_space import KEYS as DESIGN_KEYS
from rayq.report.findings import Finding
from rayq.report.tables import Table

if TYPE_CHECKING:
    from rayq.report.document import Report

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:0.6em 0 1.4em;font-size:0.86em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2} td:first-child,td:nth-child(2){text-align:left}
.note{color:#555;font-size:0.85em} img{max-width:100%;border:1px solid #eee}
.supported{background:#d9f2d9}.contradicted{background:#f8d7d7}.inconclusive{background:#fff3c4}
.not-testable{background:#eee;color:#777} code{background:#f4f4f4;padding:0 3px}
"""


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return str(v)


def _html_table(t: Table, tid: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r) + "</tr>" for r in t.rows)
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    empty = '<p class="note">no rows</p>' if not t.rows else ""
    return (
        f'<h2 id="{tid}">{html.escape(t.title)}</h2><table id="table-{tid}"><tr>{head}</tr>{body}</table>{empty}{note}'
    )


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "∞" if x > 0 else ("-∞" if x < 0 else "–")
    return f"{x:.4g}"


def _finding_rows(fs: list[Finding]) -> list[list[str]]:
    rows = []
    for f in fs:
        for p in f.parts:
            e = p.estimate
            ci = f"[{_fmt(e.low)}, {_fmt(e.high)}]" if math.isfinite(e.low) else "–"
            rows.append([
                str(f.number), f.model, p.name, _fmt(e.point), ci, f"[{_fmt(p.low)}, {_fmt(p.high)}]", p.verdict,
                f.verdict, p.note,
            ])  # fmt: skip
    return rows


FINDING_COLUMNS = ["#", "model", "statistic", "value", "95% CI", "claimed", "part", "finding", "note"]


def _manifest_rows(m: dict[str, Any]) -> list[list[str]]:
    runs = m.get("runs", [])
    rows = [
        ["sweep", str(m.get("sweep"))],
        ["sweep file", str(m.get("sweep_file"))],
        ["started", str(m.get("started_at"))],
        ["ended", str(m.get("ended_at"))],
        ["runs", str(len(runs))],
    ]
    if runs:
        rows.append(["wall time of runs (s)", ", ".join(str(r.get("wall_s")) for r in runs)])
    for k, v in (m.get("hardware") or {}).items():
        rows.append([f"hardware.{k}", str(v)])
    for k, v in (m.get("versions") or {}).items():
        rows.append([f"version.{k}", str(v)])
    return rows  # fmt: skip


def render_html(r: Report) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>rayq report: "
             f"{html.escape(str(r.manifest.get('sweep', '')))}</title><style>{CSS}</style></head><body>",
             f"<h1>rayq report: {html.escape(str(r.manifest.get('sweep', '')))}</h1>"]  # fmt: skip
    order = [("memory", "memory"), ("speed", "speed")]
    for key, tid in order:
        parts.append(_html_table(r.tables[key], tid))
    parts.append('<h2 id="figures">Figures</h2>')
    for f in r.figures:
        data = base64.b64encode(f.png).decode()
        parts.append(f'<h3>{html.escape(f.title)}</h3><img id="figure-{f.key}" alt="{html.escape(f.title)}" '
                     f'src="data:image/png;base64,{data}">')  # fmt: skip
    for key in ("slopes", "comparison", "divergence", "sqnr", "gptq", *DESIGN_KEYS):
        if key in r.tables:  # the design-space tables exist only for sweeps that recorded schemes
            parts.append(_html_table(r.tables[key], key))
    parts.append('<h2 id="findings">Findings of Roy 2023, tested</h2><p class="note">Each statistic has a 95% '
                 "bootstrap interval over (prompt, seed) pairs. Supported: the whole interval is in the claimed range; "
                 "contradicted: none of it is; inconclusive: it straddles the range; not testable: the sweep lacks "
                 "the precisions or grid values the claim needs.</p>")  # fmt: skip
    claims = {f.number: f.claim for f in r.findings}
    parts.append("<ol>" + "".join(f"<li>{html.escape(c)}</li>" for _, c in sorted(claims.items())) + "</ol>")
    head = "".join(f"<th>{c}</th>" for c in FINDING_COLUMNS)
    body = ""
    for row in _finding_rows(r.findings):
        cls = row[7].replace(" ", "-")
        body += f'<tr class="{cls}">' + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
    parts.append(f'<table id="table-findings"><tr>{head}</tr>{body}</table>')
    parts.append(_html_table(r.tables["status"], "status"))
    parts.append(_html_table(Table("The run (manifest)", ["field", "value"], _manifest_rows(r.manifest)), "manifest"))
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v).replace("|", "/").replace("\n", " ") for v in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(r: Report, fig_dir: str) -> str:
    out = [f"# rayq report: {r.manifest.get('sweep', '')}", ""]
    for key in ("memory", "speed"):
        t = r.tables[key]
        out += [f"## {t.title}", "", _md_table(t.columns, t.rows), "", t.note, ""]
    out += ["## Figures", ""] + [f"![{f.title}]({fig_dir}/{f.key}.png)" for f in r.figures] + [""]
    for key in ("slopes", "comparison", "divergence", "sqnr", "gptq", *DESIGN_KEYS):
        if key not in r.tables:
            continue
        t = r.tables[key]
        out += [f"## {t.title}", "", _md_table(t.columns, t.rows), "", t.note, ""]
    out += ["## Findings of Roy 2023, tested", "", _md_table(FINDING_COLUMNS, _finding_rows(r.findings)), ""]
    t = r.tables["status"]
    out += [f"## {t.title}", "", _md_table(t.columns, t.rows), ""]
    out += ["## The run (manifest)", "", _md_table(["field", "value"], _manifest_rows(r.manifest)), ""]
    return "\n".join(out)

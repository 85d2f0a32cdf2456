"""A built report: what render turns into HTML and Markdown (apart, so that render need not import the builder)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rayq.report.figures import Figure
from rayq.report.findings import Finding
from rayq.report.tables import Table


@dataclass(frozen=True)
class Report:
    manifest: dict[str, Any]
    tables: dict[str, Table]
    figures: list[Figure]
    findings: list[Finding]

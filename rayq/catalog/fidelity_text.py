"""The evaluation text fidelity is measured on: the shipped default (fidelity.txt) or a user's file.

Read once, by the planner, and sent to every host: a host never reads another path than the
driver did. The label (not the path) is what the models table records.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from rayq.errors import RayqError

DEFAULT_TEXT = Path(__file__).with_name("fidelity.txt")
DEFAULT_LABEL = "rayq/fidelity.txt"  # recorded in existing datasets' models tables: kept as it was


class FidelityTextError(RayqError, ValueError):
    """A fidelity text that cannot be measured on (an empty file)."""


def read_text(path: str | Path | None) -> tuple[str, str]:
    """The evaluation text and the label the models table records for it.

    The label is the file's name, not its path: two hosts that read the same text from different
    directories must record it the same way (the text's hash, in the Reference, is what makes
    sure it really is the same).
    """
    if path is None:
        file, label = DEFAULT_TEXT, DEFAULT_LABEL
    else:
        file = Path(path)
        label = file.name
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise FidelityTextError(f"the fidelity text {file} is empty")
    return text, label


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

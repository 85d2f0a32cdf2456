"""The host key: one model in one precision, the one place its text is written and read.

A *host* (one Ray actor) holds one model in one precision. Its key's text, "model/precision",
is persisted and shown: the manifest's `planned` counts, run_status.json, Ray actor names
(rayq.execution.host_pool), block ids ("model/precision|temperature=...", rayq.planning.planner),
`rayq plan` and `rayq status`. Build that text with `str(HostKey(model, precision))` and take
it apart with `HostKey.parse(text)`, never by hand, so it is written one way everywhere.

Model names follow the sweep file's name pattern (letters, digits, `.`, `_`, `-`;
docs/sweep-file.md) and precision names are registered names or schemes such as `sim-w4g128`
(rayq.catalog.schemes): neither holds a '/'. The text is still read at its *last* '/', and a
precision holding one is refused, so a model named outside a sweep file (a hub-style
"org/model") reads back whole.
"""

from __future__ import annotations

from dataclasses import dataclass

SEP = "/"


@dataclass(frozen=True, slots=True, order=True)
class HostKey:
    """One (model, precision): `str()` is "model/precision", `parse` reads it back."""

    model: str
    precision: str

    def __post_init__(self) -> None:
        if not self.model or not self.precision or SEP in self.precision:
            raise ValueError(
                f"not a host key: model {self.model!r}, precision {self.precision!r} "
                f"(both non-empty, and no {SEP!r} in a precision)"
            )

    def __str__(self) -> str:
        return f"{self.model}{SEP}{self.precision}"

    def __format__(self, spec: str) -> str:  # f"{key:40s}" pads the text
        return format(str(self), spec)

    @classmethod
    def parse(cls, text: str) -> HostKey:
        """The key whose `str()` is `text`; ValueError when `text` is not "model/precision"."""
        model, sep, precision = text.rpartition(SEP)
        if not sep:
            raise ValueError(f"not a host key: {text!r} (model/precision)")
        return cls(model, precision)

"""Quantization schemes named by their precision: what is quantized, to which format, how.

A sweep's precision names a whole scheme, so one sweep can cross weights, activations and
the KV cache in any format, and each scheme is one host, one partition and one row of the
`models` table. The grammar (docs/precisions.md):

    sim-w<F>[g<N>][-a<F>][-kv<F>[g<N>] | -qkv<Q>]     simulated weights, maybe more
    <precision>[-a<F>][-kv<F>[g<N>] | -qkv<Q>]         a registered precision plus those

- `w<F>`: weights rounded to nearest (RTN) in format F, per output channel, or per group of
  N inputs with `g<N>`; `a<F>`: the input of every linear layer, per token, dynamic;
  `kv<F>`: keys and values as they enter the cache, per token and head, or per group of N
  channels. All three are simulated: quantized and dequantized in place (rayq.host.fake_quant).
- `qkv<Q>`: a KV cache a library really stores quantized (transformers' QuantizedCache):
  `qkvfp8` (fp8 e4m3, one scale per tensor, no package needed), `qkv2quanto`,
  `qkv4quanto` (optimum-quanto), `qkv<1|2|3|4|8>hqq` (HQQ); these keep the newest 128
  tokens unquantized, as the library does.
- F is an integer width 2..8 (`w4` = int4), or fp4 (e2m1), fp6 (e3m2), fp6e2m3, fp8
  (e4m3), fp8e5m2, or an MX block format mxfp4, mxfp6, mxfp6e2m3, mxfp8, mxfp8e5m2,
  mxint8 (one power-of-two scale per 32; no `g<N>`).

This module is metadata only (no torch): names are checked when a sweep file is read.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from rayq.errors import RayqError

# The element formats of rayq.host.fake_quant.FORMATS (a test keeps the two lists equal).
FORMATS = (
    "int2", "int3", "int4", "int5", "int6", "int7", "int8",
    "fp4", "fp6", "fp6e2m3", "fp8", "fp8e5m2",
    "mxfp4", "mxfp6", "mxfp6e2m3", "mxfp8", "mxfp8e5m2", "mxint8",
)  # fmt: skip
SIM = "sim"
# Library KV caches: backend -> the bit widths it stores (transformers' QuantizedCache).
KV_LIBRARIES = {"fp8": (8,), "quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}
KV_PACKAGES = {"quanto": ("optimum.quanto",), "hqq": ("hqq",), "fp8": ()}

_PART = re.compile(
    r"^(?P<kind>w|a|kv|qkv)"
    r"(?P<fmt>mx(?:fp\d(?:e\dm\d)?|int8)|fp\d(?:e\dm\d)?|\d)"
    r"(?:g(?P<group>\d+))?(?P<lib>quanto|hqq)?$"
)


class SchemeError(RayqError, ValueError):
    """A precision name that reads as a scheme but is not a valid one; the message says why."""


@dataclass(frozen=True)
class Scheme:
    base: str  # "sim" (weights simulated from the unquantized model) or a registered precision
    weights: str | None = None  # element format of the simulated weights
    weight_group: int | None = None  # None: one scale per output channel
    acts: str | None = None
    kv: str | None = None  # element format of the KV cache (simulated, or stored by `kv_backend`)
    kv_group: int | None = None  # None: one scale per token and head
    kv_backend: str = "sim"  # sim, or the library that stores the cache: fp8, quanto, hqq

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kv_cache(self) -> str:
        """What the models table's `kv_cache` says: default, sim, or the library's backend."""
        return "default" if self.kv is None else self.kv_backend


def element_bits(fmt: str) -> int:
    """Bits per element of a format name: int4 -> 4, fp6e2m3 -> 6, mxfp8 -> 8."""
    return int(re.search(r"\d", fmt.removeprefix("mx")).group())  # type: ignore[union-attr]


def _format(token: str) -> str:
    return f"int{token}" if token.isdigit() else token


def parse(name: str, registered: set[str]) -> Scheme | None:
    """The scheme a precision name spells, or None when it is not scheme-shaped at all.

    Raises SchemeError naming the part at fault when it is scheme-shaped but wrong.
    """
    if name.startswith(SIM + "-"):
        base, rest = SIM, name[len(SIM) + 1 :]
    else:
        base = max((r for r in registered if name.startswith(r + "-")), key=len, default=None)  # type: ignore[arg-type]
        if base is None:
            return None
        rest = name[len(base) + 1 :]
    parts = rest.split("-") if rest else []
    fields: dict[str, Any] = {}
    order = ("w", "a", "kv")
    last = -1
    for part in parts:
        m = _PART.match(part)
        if m is None:
            split = re.sub(r"(?<=[\d])(?=q?kv|a)", "-", part)  # w8a8 -> w8-a8: qllm-eval's spelling
            if split != part and all(_PART.match(p) for p in split.split("-")):
                raise SchemeError(f"{name!r}: parts are joined by '-': write {name.replace(part, split)!r}")
            raise SchemeError(
                f"{name!r}: {part!r} is not a scheme part (w<F>[g<N>], a<F>, kv<F>[g<N>], qkv<Q>; "
                "F is 2..8 or one of fp4, fp6, fp6e2m3, fp8, fp8e5m2, mxfp4, mxfp6, mxfp8, mxint8; "
                "see docs/precisions.md)"
            )
        kind, fmt, group, lib = m["kind"], _format(m["fmt"]), m["group"], m["lib"]
        slot = "kv" if kind == "qkv" else kind
        if fmt not in FORMATS:
            raise SchemeError(f"{name!r}: {part!r}: unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
        if order.index(slot) <= last:
            raise SchemeError(f"{name!r}: parts come once each, in the order w, a, kv (got {part!r} out of place)")
        last = order.index(slot)
        if group is not None and (fmt.startswith("mx") or kind in ("a", "qkv")):
            why = "an MX format has its fixed block of 32" if fmt.startswith("mx") else f"{kind} takes no group"
            raise SchemeError(f"{name!r}: {part!r}: no g<N> here ({why})")
        if group is not None and int(group) < 2:
            raise SchemeError(f"{name!r}: {part!r}: a group holds at least 2 values")
        if lib is not None and kind != "qkv":
            raise SchemeError(f"{name!r}: {part!r}: a library backend ({lib}) is named only on qkv<Q>")
        if kind == "w":
            if base != SIM:
                raise SchemeError(f"{name!r}: weights are {base}'s own; w<F> goes with sim- only (e.g. sim-{part})")
            fields.update(weights=fmt, weight_group=int(group) if group else None)
        elif kind == "a":
            fields.update(acts=fmt)
        elif kind == "kv":
            fields.update(kv=fmt, kv_group=int(group) if group else None)
        else:
            backend = lib or ("fp8" if fmt == "fp8" else None)
            bits = element_bits(fmt)
            if backend is None or (backend != "fp8" and not fmt.startswith("int")):
                raise SchemeError(
                    f"{name!r}: {part!r}: a library KV cache is qkvfp8, qkv<2|4>quanto or qkv<1|2|3|4|8>hqq"
                )
            if bits not in KV_LIBRARIES[backend]:
                allowed = ", ".join(map(str, KV_LIBRARIES[backend]))
                raise SchemeError(f"{name!r}: {part!r}: {backend} stores a KV cache in {allowed} bits, not {bits}")
            fields.update(kv=fmt, kv_backend=backend)
    if base == SIM and "weights" not in fields:
        raise SchemeError(f"{name!r}: sim- starts with the weights' part, e.g. sim-w4g128 (for float weights: bf16-a8)")
    if base != SIM and not fields:
        raise SchemeError(f"{name!r}: nothing after {base!r}")
    return Scheme(base=base, **fields)


def describe(scheme: Scheme, sym: bool | None = None) -> str:
    """The scheme's weights in words, for the models table's `weight_format`."""
    if scheme.weights is None:
        return scheme.base
    if scheme.weights.startswith("mx"):
        return f"{scheme.weights} (block 32)"
    group = f"g{scheme.weight_group}" if scheme.weight_group else "per-channel"
    if scheme.weights.startswith("int"):
        return f"{scheme.weights} {group} {'sym' if sym else 'asym'}"
    return f"{scheme.weights} {group}"

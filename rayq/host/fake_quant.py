"""Simulated ("fake") quantization: round a tensor onto a low-precision format and back.

Studies of quantized LLMs (qllm-eval, the PTQ scaling-law study) compare many more formats
than any kernel implements: int2..int8 at any group size, minifloats such as fp6 and fp4,
and the OCP Microscaling (MX v1.0) block formats. Simulating them costs speed (the model
still runs its matmuls in 16 or 32 bits) but needs no kernel: each tensor is quantized and
immediately dequantized, so what the model sees is exactly the values the format can hold.

Conventions (all along the LAST dim, computed in float32, returned in the input's dtype):

- **Groups.** One scale per row of the last dim (per output channel of an ``[out, in]``
  weight, per token of activations, per token and head of a KV tensor), or one per
  ``group_size`` consecutive elements. A row whose length is not a multiple of the group
  size ends in a shorter group, quantized as if on its own.
- **int** (``int2``..``int8``): asymmetric by default (``scale = (max-min)/(2**b-1)``, an
  integer zero point ``round(-min/scale)``), or symmetric (``scale = absmax/(2**(b-1)-1)``).
  The asymmetric zero point is not clamped to ``[0, 2**b-1]``: a group of one sign (all
  post-ReLU, say) keeps all ``2**b`` levels on its own range, where a kernel that stores
  the zero point in ``b`` bits would clamp it and lose most of them.
- **float** (``fp4`` e2m1, ``fp6`` e3m2, ``fp6e2m3``, ``fp8`` e4m3fn, ``fp8e5m2``): always
  symmetric, ``scale = absmax/max_value``; the element rounds to nearest-even on the
  minifloat grid, subnormals included, saturating at ``max_value`` (no inf, no NaN code).
- **mx** (``mxfp4``, ``mxfp6``, ``mxfp6e2m3``, ``mxfp8``, ``mxfp8e5m2``, ``mxint8``): blocks
  of 32 share a power-of-two E8M0 scale ``2**(floor(log2(absmax)) - emax_elem)``, exponent
  clamped to ``[-127, 127]``, where ``emax_elem`` is the exponent of the element format's
  largest normal; elements round (saturating) onto the element format. ``mxint8`` elements
  are 8-bit two's complement fixed point ``k * 2**-6``, ``k`` in ``[-127, 127]``.
- **Scales** stay float32, where a kernel would store fp16 (bits_per_element counts 16
  bits): the difference, 2**-11 of the scale at most, is far below the format's own step.
- **Idempotence.** Quantizing a dequantized tensor again gives it back bit for bit for
  symmetric int, float and mx: the group's absmax comes back as ``fl(k * scale)``, which
  divides back by ``k`` to the same float32 scale (the tests check it on random data).
  Asymmetric int is idempotent only to float32 rounding (about one ulp): its dequantized min
  and max round separately, so their difference need not divide back to the same scale.
- A group whose scale would be 0 (all zeros; for asymmetric int, any constant group) comes
  back unchanged. Rounding is half-to-even throughout, as ``torch.round``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_FP_SCALE_BITS = 16  # an fp16 scale per group (int and float kinds)
_E8M0_BITS = 8  # an MX block's shared exponent
_MX_BLOCK = 32


@dataclass(frozen=True)
class Format:
    """One element format; for mx kinds, the element format inside the shared-scale block.

    ``mxint8`` marks its integer element with ``exp_bits == 0``: ``man_bits`` then counts the
    fixed-point fraction bits (6) and ``max_value`` is the largest element, 127/64.
    """

    name: str
    kind: str  # "int", "float" or "mx"
    bits: int
    exp_bits: int = 0
    man_bits: int = 0
    max_value: float = 0
    block: int | None = None


def _minifloat(name: str, exp_bits: int, man_bits: int, max_value: float, kind: str = "float") -> Format:
    block = _MX_BLOCK if kind == "mx" else None
    return Format(name, kind, 1 + exp_bits + man_bits, exp_bits, man_bits, max_value, block)


FORMATS: dict[str, Format] = {
    **{f"int{b}": Format(f"int{b}", "int", b) for b in range(2, 9)},
    "fp4": _minifloat("fp4", 2, 1, 6.0),
    "fp6": _minifloat("fp6", 3, 2, 28.0),
    "fp6e2m3": _minifloat("fp6e2m3", 2, 3, 7.5),
    "fp8": _minifloat("fp8", 4, 3, 448.0),
    "fp8e5m2": _minifloat("fp8e5m2", 5, 2, 57344.0),
    "mxfp4": _minifloat("mxfp4", 2, 1, 6.0, "mx"),
    "mxfp6": _minifloat("mxfp6", 3, 2, 28.0, "mx"),
    "mxfp6e2m3": _minifloat("mxfp6e2m3", 2, 3, 7.5, "mx"),
    "mxfp8": _minifloat("mxfp8", 4, 3, 448.0, "mx"),
    "mxfp8e5m2": _minifloat("mxfp8e5m2", 5, 2, 57344.0, "mx"),
    "mxint8": Format("mxint8", "mx", 8, exp_bits=0, man_bits=6, max_value=127 / 64, block=_MX_BLOCK),
}


def get_format(name: str) -> Format:
    """Look a format up by name, failing with the list a sweep file may choose from."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown quantization format {name!r}; known formats: {', '.join(FORMATS)}") from None


def _resolve(fmt: str | Format) -> Format:
    return fmt if isinstance(fmt, Format) else get_format(fmt)


def round_to_float(y: Tensor, exp_bits: int, man_bits: int, max_value: float) -> Tensor:
    """Round to nearest-even on a minifloat grid (subnormals included), saturating at ±max_value.

    The grid spacing within a binade is ``2**(exponent - man_bits)``, the exponent floored at
    the minimum normal one, ``1 - bias``: below it the spacing stays fixed, which is what
    subnormals are. Dividing by a power of two is exact, so one ``torch.round`` does it all.
    """
    if exp_bits < 1 or man_bits < 0:
        raise ValueError(f"a minifloat needs exp_bits >= 1 and man_bits >= 0, got e{exp_bits}m{man_bits}")
    bias = 2 ** (exp_bits - 1) - 1
    y = y.float()
    mag = y.abs()
    _, exp = torch.frexp(mag)  # mag = m * 2**exp with m in [0.5, 1)
    exponent = (exp - 1).clamp(min=1 - bias)
    step = torch.exp2((exponent - man_bits).float())
    return torch.copysign((torch.round(mag / step) * step).clamp(max=max_value), y)


def _is_sym(fmt: Format, sym: bool | None) -> bool:
    if fmt.kind == "int":
        return bool(sym)
    if sym is False:
        raise ValueError(f"{fmt.name} is a {fmt.kind} format, which is always symmetric: sym=False is not supported")
    return True


def _group_len(fmt: Format, group_size: int | None, row_len: int) -> int:
    """How many consecutive elements share a scale; mx formats fix it at their block."""
    if row_len < 1:
        raise ValueError(f"row length must be at least 1, got {row_len}")
    if fmt.kind == "mx":
        if group_size is not None and group_size != fmt.block:
            raise ValueError(f"{fmt.name} shares one scale per block of {fmt.block}; group_size={group_size} is not it")
        return int(fmt.block or _MX_BLOCK)
    if group_size is None:
        return row_len
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    return min(group_size, row_len)


def _to_groups(x: Tensor, g: int) -> Tensor:
    """[..., n] -> [rows, groups, g], a ragged last group padded with the row's last element.

    Repeating an element leaves the group's min, max and absmax, and so its scale, unchanged.
    """
    rows = x.reshape(-1, x.shape[-1])
    pad = -rows.shape[1] % g
    if pad:
        rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
    return rows.reshape(rows.shape[0], -1, g)


def _from_groups(groups: Tensor, shape: torch.Size) -> Tensor:
    return groups.reshape(groups.shape[0], -1)[:, : shape[-1]].reshape(shape)


def _int_sym(g: Tensor, bits: int) -> Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = g.abs().amax(-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, 1.0)
    y = torch.round(g / safe).clamp(-qmax - 1, qmax) * safe
    return torch.where(scale > 0, y, g)


def _int_asym(g: Tensor, bits: int) -> Tensor:
    levels = 2**bits - 1
    lo = g.amin(-1, keepdim=True)
    scale = (g.amax(-1, keepdim=True) - lo) / levels
    safe = torch.where(scale > 0, scale, 1.0)
    zero = torch.round(-lo / safe)
    q = (torch.round(g / safe) + zero).clamp(0, levels)
    return torch.where(scale > 0, (q - zero) * safe, g)


def _float(g: Tensor, fmt: Format) -> Tensor:
    scale = g.abs().amax(-1, keepdim=True) / fmt.max_value
    safe = torch.where(scale > 0, scale, 1.0)
    y = round_to_float(g / safe, fmt.exp_bits, fmt.man_bits, fmt.max_value) * safe
    return torch.where(scale > 0, y, g)


def _mx(g: Tensor, fmt: Format) -> Tensor:
    """The block's absmax lands in the element format's top binade; E8M0 bounds the exponent."""
    emax = math.frexp(fmt.max_value)[1] - 1  # exponent of the largest normal element
    _, exp = torch.frexp(g.abs().amax(-1, keepdim=True))
    scale = torch.exp2((exp - 1 - emax).clamp(-127, 127).float())
    elems = g / scale
    if fmt.exp_bits == 0:  # mxint8: fixed point with man_bits fraction bits
        unit = 2.0**fmt.man_bits
        kmax = 2 ** (fmt.bits - 1) - 1
        q = torch.round(elems * unit).clamp(-kmax, kmax) / unit
    else:
        q = round_to_float(elems, fmt.exp_bits, fmt.man_bits, fmt.max_value)
    return q * scale


def fake_quantize(x: Tensor, fmt: str | Format, group_size: int | None = None, sym: bool | None = None) -> Tensor:
    """Quantize along the last dim and dequantize, so a model computes with the format's values.

    Returned in x's dtype and shape; the arithmetic is float32 whatever x is, so a bf16 input
    does not add its own rounding to the format's.
    """
    fmt = _resolve(fmt)
    symmetric = _is_sym(fmt, sym)
    if x.dim() == 0:
        raise ValueError("fake_quantize needs at least one dim: it quantizes along the last")
    if not x.is_floating_point():
        raise TypeError(f"fake_quantize needs a floating-point tensor, got {x.dtype}")
    g = _group_len(fmt, group_size, max(x.shape[-1], 1))
    if x.numel() == 0:
        return x.clone()
    groups = _to_groups(x.float(), g)
    if fmt.kind == "int":
        out = _int_sym(groups, fmt.bits) if symmetric else _int_asym(groups, fmt.bits)
    elif fmt.kind == "float":
        out = _float(groups, fmt)
    elif fmt.kind == "mx":
        out = _mx(groups, fmt)
    else:
        raise ValueError(f"format {fmt.name} has unknown kind {fmt.kind!r}; expected int, float or mx")
    return _from_groups(out, x.shape).to(x.dtype)


def bits_per_element(fmt: str | Format, group_size: int | None, row_len: int, sym: bool | None = None) -> float:
    """Storage cost including scales, the x-axis a study compares formats on.

    A scale is an fp16 (plus a ``bits``-bit zero point for asymmetric int) or an E8M0 byte
    per mx block. A ragged last group pays for a whole scale, so the count is per row.
    """
    fmt = _resolve(fmt)
    symmetric = _is_sym(fmt, sym)
    g = _group_len(fmt, group_size, row_len)
    if fmt.kind == "mx":
        scale_bits = _E8M0_BITS
    else:
        scale_bits = _FP_SCALE_BITS + (fmt.bits if fmt.kind == "int" and not symmetric else 0)
    return fmt.bits + scale_bits * math.ceil(row_len / g) / row_len


def _energies(x: Tensor, approx: Tensor) -> tuple[float, float]:
    """Signal and noise energy in float64: a whole pass's sum overflows nothing and loses little."""
    if x.shape != approx.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(approx.shape)}")
    ref = x.double()
    return float(ref.square().sum()), float((ref - approx.double()).square().sum())


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def sqnr_db(x: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; inf when approx is exact."""
    return _db(*_energies(x, approx))


class NoiseMeter:
    """Sums energies over many calls: one SQNR for a whole pass, not a mean of per-call dBs.

    A mean of dBs would weight a near-silent tensor's poor ratio like a loud one's.
    """

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.count = 0

    def add(self, x: Tensor, approx: Tensor) -> None:
        signal, noise = _energies(x, approx)
        self.signal += signal
        self.noise += noise
        self.count += 1

    def db(self) -> float | None:
        return None if self.count == 0 else _db(self.signal, self.noise)

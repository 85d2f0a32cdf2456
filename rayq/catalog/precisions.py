"""The one registry of precisions a model can be run in.

Each entry is metadata only (no torch import), so that validating a sweep file and
`rayq plan` stay fast; the loader for a family lives in its own module
(`rayq/host/precisions/<family>.py`) and is imported only inside the model host
(`rayq.host.precisions.load_model`). Adding a precision is one `register(...)` line here and,
for a new family, one file that defines `load(info, model_dir, device, options) -> (model, settings)`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass, field, replace
from typing import Any

from rayq.catalog import schemes
from rayq.errors import RayqError


@dataclass(frozen=True)
class PrecisionInfo:
    name: str
    family: str
    bytes_per_param: float
    requires: tuple[str, ...] = ("torch",)
    help: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    # Settings a sweep file may give under `precision_options.<name>`: option -> (type, allowed values or None).
    options: dict[str, tuple[type, tuple[Any, ...] | None]] = field(default_factory=dict)
    # For memory estimates (rayq.planning.estimate): the quantizer's scales per quantized parameter,
    # the peak while loading as a multiple of the weights, and the share of each GPU's
    # memory the loader lets the model fill.
    scale_bytes_per_param: float = 0.0
    load_factor: float = 1.0
    max_memory_fraction: float = 1.0
    # For speed predictions (rayq.planning.throughput): the fixed cost of one decoding step per layer
    # on a GPU at batch 1 (Python, kernel launches, dequantization), on top of reading the
    # weights. Calibrated on Table 7 of Roy 2023 (transformers on an A100 80GB): the median
    # over its models of (step time - weight bytes / 70% of the bandwidth) / layers.
    step_ms_per_layer: float = 0.58
    # A quantization scheme spelled by the name (rayq.catalog.schemes): simulated weights,
    # activations or KV cache, alone or on top of a registered precision. None: a plain entry.
    scheme: schemes.Scheme | None = None


REGISTRY: dict[str, PrecisionInfo] = {}


class UnknownPrecisionError(RayqError, KeyError):
    """A precision name that is neither registered nor a valid scheme (a KeyError, as it always was)."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(info: PrecisionInfo) -> PrecisionInfo:
    if info.name in REGISTRY:
        raise ValueError(f"precision {info.name!r} is registered twice")
    REGISTRY[info.name] = info
    return info


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> PrecisionInfo:
    """A registered precision, or the scheme its name spells (e.g. sim-w4g128, bnb-nf4-kv4).

    A scheme-shaped name that is wrong raises UnknownPrecisionError saying which part is.
    """
    if name in REGISTRY:
        return REGISTRY[name]
    try:
        return _scheme_info(name)
    except schemes.SchemeError as e:
        raise UnknownPrecisionError(str(e)) from None


@functools.cache
def _scheme_info(name: str) -> PrecisionInfo:
    scheme = schemes.parse(name, set(REGISTRY))
    if scheme is None:
        raise schemes.SchemeError(
            f"unknown precision {name!r}; known precisions: {', '.join(REGISTRY)}, "
            "and quantization schemes such as sim-w4g128, sim-w8-a8, sim-wfp4-kv4, bnb-nf4-kv4 (docs/precisions.md)"
        )
    kv_packages = schemes.KV_PACKAGES.get(scheme.kv_backend, ())
    if scheme.base == schemes.SIM:
        base = PrecisionInfo(
            name, "sim", 2.0, help="simulated quantization (rayq.host.fake_quant) of the unquantized weights",
            options={"sym": (bool, None), "dtype": (str, _DTYPES)},
        )  # fmt: skip
    else:
        base = REGISTRY[scheme.base]
    return replace(base, name=name, scheme=scheme, requires=base.requires + kv_packages)


def option_errors(name: str, options: dict[str, Any]) -> list[str]:
    """Why `options` are not valid settings of precision `name` (empty: they are)."""
    info = get(name)
    errors = []
    for key, value in options.items():
        if key not in info.options:
            allowed = ", ".join(info.options) or "none"
            errors.append(f"{key}: not a setting of {name} (its settings: {allowed})")
            continue
        typ, choices = info.options[key]
        ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            errors.append(f"{key}: must be {typ.__name__} (got {value!r})")
        elif choices is not None and value not in choices:
            errors.append(f"{key}: must be one of {', '.join(map(str, choices))} (got {value!r})")
    return errors


def missing_packages(info: PrecisionInfo) -> list[str]:
    def absent(pkg: str) -> bool:
        try:
            return importlib.util.find_spec(pkg) is None
        except ModuleNotFoundError:  # a dotted name whose parent package is missing
            return True

    return [pkg for pkg in info.requires if absent(pkg)]


register(PrecisionInfo("fp32", "dense", 4.0, help="unquantized, float32"))
register(PrecisionInfo("bf16", "dense", 2.0, help="unquantized, bfloat16"))
register(PrecisionInfo("fp16", "dense", 2.0, help="unquantized, float16"))

_BNB = ("torch", "bitsandbytes")
_DTYPES = ("float32", "bfloat16", "float16")
# transformers' bitsandbytes quantizers cut every device's max_memory to 90% ("space for
# buffers created during quantization"), so a bnb model may fill only that much of a GPU.
_BNB_MEMORY_FRACTION = 0.9
register(
    PrecisionInfo(
        "bnb-int8", "bnb", 1.0, _BNB, "bitsandbytes LLM.int8 (outlier threshold: library default 6.0)",
        options={"llm_int8_threshold": (float, None)},
        # One fp32 absmax per output row (negligible). The load factor is calibrated, not
        # derived: the paper's llama2-70b int8 (weights 65 GiB) did not load on one 80 GB
        # A100 while falcon-40b int8 (39 GiB) did; 1.2 is the round factor that agrees with
        # both (docs/cluster.md). Measure `peak_memory_mb` on a GPU to refine it.
        load_factor=1.2,
        max_memory_fraction=_BNB_MEMORY_FRACTION,
        step_ms_per_layer=3.8,  # LLM.int8's outlier decomposition: the slowest in Table 7
    )
)  # fmt: skip
for _qt in ("nf4", "fp4"):
    for _dq in (False, True):
        register(
            PrecisionInfo(
                f"bnb-{_qt}{'-dq' if _dq else ''}", "bnb", 0.5, _BNB,
                f"bitsandbytes 4-bit {_qt}{', double quantization' if _dq else ''}",
                {"quant_type": _qt, "double_quant": _dq},
                options={"compute_dtype": (str, _DTYPES)},
                # absmax per block of 64: fp32 (4/64), or 8-bit plus an fp32 per 256 blocks when double-quantized
                scale_bytes_per_param=(1 / 64 + 4 / (64 * 256)) if _dq else 4 / 64,
                max_memory_fraction=_BNB_MEMORY_FRACTION,
                step_ms_per_layer=1.29 if _dq else 1.06,  # dequantizing the weights at every step
            )
        )  # fmt: skip

register(
    PrecisionInfo(
        "gptq-int4", "gptq", 0.5, ("torch", "gptqmodel", "optimum"),
        "GPTQ 4-bit through GPTQModel, quantized once per settings into a cache",
        scale_bytes_per_param=(2 + 0.5) / 128,  # an fp16 scale and a 4-bit zero per group of 128
        step_ms_per_layer=1.06,  # not in Table 7: assumed like bitsandbytes 4-bit (fused dequantizing kernels)
        # "auto": the largest of 128, 64, 32 dividing every quantized layer's input size (rayq.host.precisions.gptq)
        defaults={"group_size": "auto"},
        options={
            "group_size": (object, ("auto", -1, 32, 64, 128, 256)),  # object: a word or a number
            "desc_act": (bool, None),
            "sym": (bool, None),
            "calibration_texts": (list, None),
            "calibration_count": (int, None),
        },
    )
)  # fmt: skip

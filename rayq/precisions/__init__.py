"""The one registry of precisions a model can be run in.

Each entry is metadata only (no torch import), so that validating a sweep file and
`rayq plan` stay fast; the loader for a family lives in its own module
(`rayq/precisions/<family>.py`) and is imported only inside the model host.
Adding a precision is one `register(...)` line here and, for a new family, one file
that defines `load(info, model_dir, device, options) -> (model, settings)`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass, field, replace
from typing import Any

from rayq.precisions import scheme as schemes


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
    # For memory estimates (rayq.estimate): the quantizer's scales per quantized parameter,
    # the peak while loading as a multiple of the weights, and the share of each GPU's
    # memory the loader lets the model fill.
    scale_bytes_per_param: float = 0.0
    load_factor: float = 1.0
    max_memory_fraction: float = 1.0
    # For speed predictions (rayq.throughput): the fixed cost of one decoding step per layer
    # on a GPU at batch 1 (Python, kernel launches, dequantization), on top of reading the
    # weights. Calibrated on Table 7 of Roy 2023 (transformers on an A100 80GB): the median
    # over its models of (step time - weight bytes / 70% of the bandwidth) / layers.
    step_ms_per_layer: float = 0.58
    # A quantization scheme spelled by the name (rayq.precisions.scheme): simulated weights,
    # activations or KV cache, alone or on top of a registered precision. None: a plain entry.
    scheme: schemes.Scheme | None = None


REGISTRY: dict[str, PrecisionInfo] = {}


class UnknownPrecisionError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class MissingBackendError(ImportError):
    pass


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
            name, "sim", 2.0, help="simulated quantization (rayq.fake_quant) of the unquantized weights",
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


def dequantizer(name: str, model: Any) -> Any:
    """`fn(module_name, module) -> float weight or None` for per-layer SQNR: the family's
    `dequantizer(model)` if it has one (it needs the model, e.g. to find its checkpoint),
    else its `dequantize(module)`."""
    family = importlib.import_module(f"rayq.precisions.{get(name).family}")
    if hasattr(family, "dequantizer"):
        return family.dequantizer(model)
    return lambda _name, module: family.dequantize(module)


def missing_packages(info: PrecisionInfo) -> list[str]:
    def absent(pkg: str) -> bool:
        try:
            return importlib.util.find_spec(pkg) is None
        except ModuleNotFoundError:  # a dotted name whose parent package is missing
            return True

    return [pkg for pkg in info.requires if absent(pkg)]


def load_model(name: str, model_dir: str, device: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Load `model_dir` in precision `name`; returns the model and every setting used.

    The settings are recorded with the results, so a library default rayq relies on is
    visible in the data rather than implied.
    """
    info = get(name)
    missing = missing_packages(info)
    if missing:
        raise MissingBackendError(
            f"precision {name!r} needs the package(s) {', '.join(missing)}, which are not installed"
        )
    family = importlib.import_module(f"rayq.precisions.{info.family}")
    scheme = info.scheme
    model, settings = family.load(_own(info), model_dir, device, {**info.defaults, **options})
    if scheme is not None:
        from rayq import sim_quant

        settings["scheme"] = scheme.as_dict()
        settings.update(sim_quant.attach(model, scheme))
    return model, settings


def _own(info: PrecisionInfo) -> PrecisionInfo:
    """The registered precision a scheme is built on (bnb-nf4 for bnb-nf4-kv4), which loads and is
    described as itself; a sim- scheme or a plain entry is its own."""
    scheme = info.scheme
    return REGISTRY[scheme.base] if scheme is not None and scheme.base != schemes.SIM else info


def weight_columns(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The models table's weight_format, weight_bits, act_bits, kv_bits and kv_cache of a host.

    The weights are described by the family's `weight_format(info, settings)` where it has
    one (the group size GPTQ chose, the format sim rounded to), else by the registry entry.
    """
    info = get(name)
    own = _own(info)
    family = importlib.import_module(f"rayq.precisions.{own.family}")
    if hasattr(family, "weight_format"):
        fmt, bits = family.weight_format(own, settings)
    else:
        fmt, bits = own.name, 8 * (own.bytes_per_param + own.scale_bytes_per_param)
    scheme = info.scheme
    return {
        "weight_format": fmt,
        "weight_bits": bits,
        "act_bits": schemes.element_bits(scheme.acts) if scheme is not None and scheme.acts else None,
        "kv_bits": schemes.element_bits(scheme.kv) if scheme is not None and scheme.kv else None,
        "kv_cache": "default" if scheme is None else scheme.kv_cache,
    }


def from_pretrained(model_dir: str, device: str, options: dict[str, Any], **kwargs: Any) -> Any:
    """The one place a family calls transformers' loader, so every family honours the
    model's revision, trust_remote_code and multi-GPU sharding the same way.

    `device` "auto" with `options["max_memory"]` shards the model over the GPUs the host
    was given (accelerate's device_map); transformers' bitsandbytes quantizers then keep
    10% of each GPU back themselves.
    """
    from transformers import AutoModelForCausalLM

    if options.get("max_memory"):
        kwargs["max_memory"] = options["max_memory"]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        device_map=device,
        revision=options.get("revision"),
        trust_remote_code=bool(options.get("trust_remote_code", False)),
        **kwargs,
    )
    model.eval()
    return model


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
        # "auto": the largest of 128, 64, 32 dividing every quantized layer's input size (rayq.precisions.gptq)
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

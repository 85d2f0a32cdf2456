"""Loading a model in a registered precision, inside the model host.

The registry (`rayq.catalog.precisions`) says what a precision is; the module of its family
here (`dense.py`, `bnb.py`, `gptq.py`, `sim.py`) says how it loads, and is imported by name only
when a host loads a model, so that nothing outside a host pays for torch or the backend library.
"""

from __future__ import annotations

import importlib
from typing import Any

from rayq.catalog import schemes
from rayq.catalog.precisions import REGISTRY, PrecisionInfo, get, missing_packages


class MissingBackendError(ImportError):
    pass


def _family(name: str) -> Any:
    return importlib.import_module(f"rayq.host.precisions.{name}")


def dequantizer(name: str, model: Any) -> Any:
    """`fn(module_name, module) -> float weight or None` for per-layer SQNR: the family's
    `dequantizer(model)` if it has one (it needs the model, e.g. to find its checkpoint),
    else its `dequantize(module)`."""
    family = _family(get(name).family)
    if hasattr(family, "dequantizer"):
        return family.dequantizer(model)
    return lambda _name, module: family.dequantize(module)


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
    family = _family(info.family)
    scheme = info.scheme
    model, settings = family.load(_own(info), model_dir, device, {**info.defaults, **options})
    if scheme is not None:
        from rayq.host import sim_quant

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
    family = _family(own.family)
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

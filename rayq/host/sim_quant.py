"""A loaded model's simulated activations and KV cache, attached once by the loader.

- Activations: a forward pre-hook on every linear layer but the output layer quantizes its
  input per token, dynamically (symmetric for integers, as W8A8 schemes do), so every
  caller (generation, the greedy reference, fidelity) sees the same scheme.
- The KV cache: `new_cache(model)` gives the cache a decoding loop must pass as
  `past_key_values`: transformers' own cache whose layers quantize keys and values as they
  enter it (simulated), or transformers' QuantizedCache, which stores them quantized (fp8,
  quanto, HQQ). None means the model's default cache.
- SQNR: while `measuring(model)` is on, the hooks add each quantized tensor's signal and
  noise energy to one meter per kind, so a scheme's activation and KV error can be related
  to its fidelity. Off otherwise, so generation pays nothing for it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rayq.catalog.schemes import Scheme
from rayq.host.fake_quant import NoiseMeter, fake_quantize
from rayq.host.precisions.sim import KEEP  # the output layer's input stays unquantized, like its weights

QUANTIZED_CACHE_RESIDUAL = 128  # transformers' default: the newest tokens stay unquantized


@dataclass
class SimState:
    scheme: Scheme
    measuring: bool = False
    acts: NoiseMeter = field(default_factory=NoiseMeter)
    kv: NoiseMeter = field(default_factory=NoiseMeter)
    hooks: list[Any] = field(default_factory=list)


def state(model: Any) -> SimState | None:
    return getattr(model, "_rayq_sim", None)


def attach(model: Any, scheme: Scheme) -> dict[str, Any]:
    """Hook the scheme's activations into `model`; returns the settings to record."""
    import torch

    st = SimState(scheme)
    model._rayq_sim = st
    settings: dict[str, Any] = {"kv_cache": scheme.kv_cache}
    if scheme.acts is not None:
        sym = True if scheme.acts.startswith("int") else None

        def quantize_input(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            q = fake_quantize(x, scheme.acts, None, sym)  # type: ignore[arg-type]
            if st.measuring:
                st.acts.add(x, q)
            return (q, *args[1:])

        for name, module in model.named_modules():
            linear = isinstance(module, torch.nn.Linear) or hasattr(module, "qweight")
            if linear and name.split(".")[-1] not in KEEP:
                st.hooks.append(module.register_forward_pre_hook(quantize_input))
        settings["act_quantized_layers"] = len(st.hooks)
    if scheme.kv_backend in ("quanto", "hqq"):
        settings["kv_residual_length"] = QUANTIZED_CACHE_RESIDUAL
        settings["kv_group_size"] = library_kv_group(model.config)
    return settings


def new_cache(model: Any) -> Any | None:
    """The KV cache a decoding loop passes as `past_key_values` (None: the model's default)."""
    st = state(model)
    if st is None or st.scheme.kv is None:
        return None
    from transformers import DynamicCache, QuantizedCache

    scheme = st.scheme
    if scheme.kv_backend != "sim":  # a library stores the cache: transformers' QuantizedCache
        if scheme.kv_backend == "fp8":
            cache = QuantizedCache("fp8", model.config)
        else:
            bits = int(scheme.kv.removeprefix("int"))
            residual, group = QUANTIZED_CACHE_RESIDUAL, library_kv_group(model.config)
            cache = QuantizedCache(
                scheme.kv_backend, model.config, nbits=bits, residual_length=residual, q_group_size=group
            )
        for layer in cache.layers:
            layer.__class__ = _metered_class(type(layer))
            layer._rayq_sim = st
        return cache
    cache = DynamicCache(config=model.config)
    if not cache.layers:  # built lazily (no config-declared layer types): sim layers from the start
        sim = _sim_layer_class(cache.layer_class_to_replicate)
        cache.layer_class_to_replicate = type(sim.__name__, (sim,), {"_rayq_sim": st})
        return cache
    for layer in cache.layers:
        layer.__class__ = _sim_layer_class(type(layer))
        layer._rayq_sim = st
    return cache


def library_kv_group(config: Any) -> int:
    """The group size of a quanto / HQQ cache: transformers' default of 64, or the largest
    power of two dividing the head size below it (quanto groups the flattened heads, and a
    group must divide every length the cache takes; a head of 80 gets 16)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return math.gcd(64, int(head))


def quantize_kv(st: SimState, t: Any) -> Any:
    """Keys or values as the scheme stores them: integers asymmetric per token (as KIVI), floats scaled by absmax."""
    q = fake_quantize(t, st.scheme.kv, st.scheme.kv_group, None)  # type: ignore[arg-type]
    if st.measuring:
        st.kv.add(t, q)
    return q


_LAYER_CLASSES: dict[type, type] = {}


def _sim_layer_class(base: type) -> type:
    """A subclass of a cache layer class that quantizes what enters it.

    Subclassing whatever layer transformers chose (full or sliding window) keeps its
    semantics; only the entries change. The layer finds its scheme on itself
    (`_rayq_sim`) or, when the cache made it lazily, on the class.
    """
    if base in _LAYER_CLASSES:
        return _LAYER_CLASSES[base]

    def update(self: Any, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
        st = self._rayq_sim
        return base.update(self, quantize_kv(st, key_states), quantize_kv(st, value_states), *args, **kwargs)

    cls = type(f"SimQuant{base.__name__}", (base,), {"update": update})
    _LAYER_CLASSES[base] = cls
    return cls


def _metered_class(base: type) -> type:
    """A QuantizedCache layer class (fp8, quanto, HQQ), its quantization noise metered like the simulated caches'.

    The stored tensors stay the library's own; only what `_quantize` loses, read back
    through the layer's own `_dequantize`, is added to the KV meter. quanto and HQQ
    re-quantize the whole cache when their residual window flushes, so entries already
    quantized are metered again (with little noise): their SQNR leans high.
    """
    if base in _LAYER_CLASSES:
        return _LAYER_CLASSES[base]

    def _quantize(self: Any, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        q = base._quantize(self, tensor, *args, **kwargs)
        st = self._rayq_sim
        if st.measuring:
            st.kv.add(tensor, self._dequantize(q))
        return q

    cls = type(f"Metered{base.__name__}", (base,), {"_quantize": _quantize})
    _LAYER_CLASSES[base] = cls
    return cls


@contextlib.contextmanager
def measuring(model: Any) -> Iterator[SimState | None]:
    """Meter the activation and KV quantization noise of the forward passes inside the block."""
    st = state(model)
    if st is None:
        yield None
        return
    st.measuring = True
    try:
        yield st
    finally:
        st.measuring = False

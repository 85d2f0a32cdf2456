"""Memory estimates for a model in a precision, made before anything loads.

Placement needs them before a host exists: a 70B model must be known to need two 80 GiB
GPUs before an actor holding one of them fails to load it. The estimate is arithmetic on
the model's shape (its config, or a `size:` hint in the sweep file for a hub model this
machine cannot read) and the precision's registry entry:

- weights: quantized linear layers at the precision's bytes per parameter plus its scales;
  embeddings (and an untied output layer) stay in 16 bits, as bitsandbytes and GPTQ leave them;
- KV cache: 2 x layers x kv_heads x head_dim x bytes x (prompt + max_new_tokens) x batch;
- activations and logits of one step (small next to the rest);
- the peak while loading: the weights times the precision's `load_factor`;
- per GPU, a CUDA context and cuBLAS workspace (`CUDA_CONTEXT_BYTES`).

docs/cluster.md compares the weights term with the paper's measured footprints (Table 6).
Imports neither torch nor ray: `rayq plan` runs it on a laptop for a 70B sweep.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayq.catalog.bundled import BUNDLED_SHAPES, cache_dir
from rayq.catalog.precisions import get
from rayq.errors import RayqError

GiB = 1024**3
# A CUDA context plus cuBLAS workspace per GPU a process uses; an assumption rounded up
# from what torch 2.x processes commonly hold before any tensor, not measured here.
CUDA_CONTEXT_BYTES = 1 * GiB
KEPT_BYTES = 2  # embeddings and norms of a quantized model stay in fp16/bf16

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1024,
    "kib": 1024,
    "mb": 1024**2,
    "mib": 1024**2,
    "gb": GiB,
    "gib": GiB,
    "tb": 1024**4,
    "tib": 1024**4,
}
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


class SizeError(RayqError, ValueError):
    """A memory size or parameter count that cannot be read; the message shows how to write one."""


def parse_bytes(text: str) -> int:
    """'80GB' -> bytes. GB is read as GiB, as GPU makers mean it (an '80GB' A100 has 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise SizeError(f"{text!r} is not a memory size; write e.g. 80GB, 80GiB or 40960MiB")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise SizeError(f"{text!r}: a memory size must be more than 0")
    return int(value)


def parse_count(value: int | str) -> int:
    """6738415616, '6.74B', '135M' -> a parameter count."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*", value)
    if not m:
        raise SizeError(f"{value!r} is not a parameter count; write e.g. 6738415616, 6.74B or 135M")
    return int(float(m.group(1)) * _COUNT_UNITS[m.group(2).lower()])


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model; `None` where it is not known."""

    params: int
    layers: int | None = None
    hidden_size: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    tied_embeddings: bool = False
    source: str = ""  # where the shape came from, shown by `rayq plan`

    @property
    def embedding_params(self) -> int:
        """Parameters that no quantizer here touches: the input embedding, and the output layer unless tied."""
        if self.vocab_size is None or self.hidden_size is None:
            return 0
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int | None:
        if None in (self.layers, self.kv_heads, self.head_dim):
            return None
        assert self.layers and self.kv_heads and self.head_dim
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def shape_from_config(config: dict[str, Any], params: int | None, source: str) -> ModelShape:
    """A shape from a transformers config.json (llama, falcon, gpt-neox and most causal LMs)."""

    def first(*keys: str) -> Any:
        for k in keys:
            if config.get(k) is not None:
                return config[k]
        return None

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads")
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    kv = first("num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv is None and config.get("multi_query"):
        kv = 1
    head_dim = first("head_dim") or (hidden // heads if hidden and heads else None)
    vocab = first("vocab_size")
    tied = bool(config.get("tie_word_embeddings", True))
    if params is None:
        params = _params_from_config(config, layers, hidden, heads, kv or heads, head_dim, vocab, tied)
    return ModelShape(params, layers, hidden, kv or heads, head_dim, vocab, tied, source)


def _params_from_config(
    config: dict[str, Any], layers: Any, hidden: Any, heads: Any, kv: Any, head_dim: Any, vocab: Any, tied: bool
) -> int:
    """A llama-style count when no weights are on disk to count (attention, gated MLP, embeddings)."""
    if None in (layers, hidden, heads, head_dim, vocab):
        raise ValueError("the config lacks the sizes needed to count parameters")
    inter = config.get("intermediate_size") or 4 * hidden
    attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    mlp = 3 * hidden * inter
    return int(layers * (attn + mlp) + vocab * hidden * (1 if tied else 2))


def count_safetensors(model_dir: Path) -> int | None:
    """Exact parameter count from the safetensors headers (a few KiB read, no weights)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def shape_of(model: Any) -> ModelShape | None:
    """The shape of a sweep's model (`rayq.planning.spec.ModelSpec`), or None when nothing says it.

    A `size:` hint wins; otherwise a local config is read (a path model, the bundled model's
    converted copy, or a hub model already in the Hugging Face cache). Nothing is downloaded.
    """
    if model.size is not None:
        s = model.size
        head_dim = s.head_dim or (s.hidden_size // s.heads if s.hidden_size and s.heads else None)
        return ModelShape(
            parse_count(s.params),
            s.layers,
            s.hidden_size,
            s.kv_heads or s.heads,
            head_dim,
            s.vocab_size,
            s.tied_embeddings,
            "size hint in the sweep file",
        )
    config_dir = _local_config_dir(model)
    if config_dir is None:
        if model.bundled is not None:
            fields = BUNDLED_SHAPES.get(model.bundled)
            return None if fields is None else ModelShape(*fields, "bundled model")
        return None
    config = json.loads((config_dir / "config.json").read_text())
    return shape_from_config(config, count_safetensors(config_dir), f"config in {config_dir}")


def _local_config_dir(model: Any) -> Path | None:
    if model.path is not None:
        return Path(model.path)
    if model.bundled is not None:
        d = cache_dir() / "models" / model.bundled
        return d if (d / "config.json").is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model.hub, "config.json", revision=model.revision)
    except Exception:  # noqa: BLE001 - no hub library or no cache: the shape is just unknown
        return None
    return Path(found).parent if isinstance(found, str) else None


@dataclass(frozen=True)
class Estimate:
    """Bytes a host needs on its device(s), by part; `total` is what placement must find."""

    weights: int
    kv_cache: int
    activations: int
    load_peak: int
    per_gpu: int  # paid once on every GPU the host uses
    kv_known: bool

    @property
    def running(self) -> int:
        return self.weights + self.kv_cache + self.activations

    @property
    def total(self) -> int:
        """Peak bytes on the model's devices, not counting the per-GPU context."""
        return max(self.running, self.load_peak)

    def describe(self) -> str:
        kv = fmt_gib(self.kv_cache) if self.kv_known else "unknown (no layer sizes)"
        return (
            f"weights {fmt_gib(self.weights)}, KV cache {kv}, activations {fmt_gib(self.activations)}, "
            f"load peak {fmt_gib(self.load_peak)}, + {fmt_gib(self.per_gpu)} per GPU"
        )


def estimate(shape: ModelShape, precision: str, max_tokens: int, batch: int, kept_bytes: int = KEPT_BYTES) -> Estimate:
    """The memory `shape` needs in `precision` when decoding `batch` rows of up to `max_tokens` tokens.

    `kept_bytes`: bytes per parameter of what a quantizer leaves alone (4 reproduces 2023
    loaders, which kept it in fp32 unless told a dtype: the paper's Table 6).
    """

    info = get(precision)
    if info.family == "dense":
        weights = shape.params * info.bytes_per_param
        dtype_bytes = int(info.bytes_per_param)
    else:
        kept = min(shape.embedding_params, shape.params)
        weights = (shape.params - kept) * (info.bytes_per_param + info.scale_bytes_per_param) + kept * kept_bytes
        dtype_bytes = KEPT_BYTES
    per_token = shape.kv_bytes_per_token(dtype_bytes)
    kv = (per_token or 0) * max_tokens * batch
    hidden = shape.hidden_size or 0
    # One step's hidden states (a few live copies) and the fp32 logits of the last position.
    activations = batch * max_tokens * hidden * dtype_bytes * 8 + batch * (shape.vocab_size or 0) * 4 * 2
    return Estimate(
        weights=int(weights),
        kv_cache=int(kv),
        activations=int(activations),
        load_peak=int(weights * info.load_factor),
        per_gpu=CUDA_CONTEXT_BYTES,
        kv_known=per_token is not None,
    )

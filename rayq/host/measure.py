"""What a model host measures about its loaded model, once, before it generates anything.

- the bytes the model really holds, quantization scales included (transformers'
  `get_memory_footprint` counts parameters and buffers, so it misses bitsandbytes' absmax
  scales, which is all that double quantization shrinks);
- per-layer weight SQNR against the unquantized weights on disk,
  10 log10(|W|^2 / |W - dequant(W)|^2), so quality can be related to quantization error;
- a short greedy reference continuation, so two precisions can be compared token by token.

SQNR runs before the first forward pass: bitsandbytes repacks 4-bit weights for its CPU
kernels on the first call, after which the stored layout is no longer the quantized one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rayq.store.divergence import first_divergence  # noqa: F401 - its old home: callers that import it from here keep working

REFERENCE_PROMPT = "Life in London"
REFERENCE_TOKENS = 32

# Layer groups of the paper's Table 3, by the module names of common architectures.
_KINDS = [
    ("mlp.proj", re.compile(r"(down_proj|dense_4h_to_h|c_proj|fc2|w2)$")),
    ("att.proj", re.compile(r"(o_proj|attention\.dense|self_attention\.dense|out_proj)$")),
    ("mlp.fc", re.compile(r"(gate_proj|up_proj|dense_h_to_4h|c_fc|fc1|w1|w3|gate_up_proj)$")),
    ("attn.attn", re.compile(r"(q_proj|k_proj|v_proj|query_key_value|c_attn|qkv_proj|Wqkv)$")),
]


def layer_kind(name: str) -> str:
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind
    return "other"


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors hanging off a bitsandbytes quantization state (absmax, code, nested state)."""
    out = []
    for attr in ("absmax", "code", "offset"):
        t = getattr(obj, attr, None)
        if isinstance(t, torch.Tensor):
            out.append(t)
    nested = getattr(obj, "state2", None)
    if nested is not None:
        out.extend(_tensors(nested))
    return out


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor the model holds: parameters, buffers and quantization state."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        for t in _tensors(getattr(p, "quant_state", None)):
            add(t)
        scb = getattr(p, "SCB", None)  # LLM.int8's per-row scales
        if isinstance(scb, torch.Tensor):
            add(scb)
    for b in model.buffers():
        add(b)
    return total


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.float()
    noise = (ref - approx.float()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _reference_weights(model_dir: str) -> Callable[[str], torch.Tensor | None]:
    """A lookup of the unquantized weights in a local safetensors checkpoint, read lazily."""
    from safetensors import safe_open

    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = {k: root / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    else:
        single = root / "model.safetensors"
        if not single.is_file():
            return lambda name: None
        with safe_open(str(single), "pt") as fh:
            files = {k: single for k in fh.keys()}

    def get(name: str) -> torch.Tensor | None:
        path = files.get(name)
        if path is None:
            return None
        with safe_open(str(path), "pt") as fh:
            return fh.get_tensor(name)

    return get


def layer_sqnr(
    model: torch.nn.Module,
    model_dir: str | None,
    dequantize: Callable[[str, torch.nn.Module], torch.Tensor | None],
) -> list[dict[str, Any]]:
    """SQNR of every linear layer's weight whose unquantized original is on disk."""
    if model_dir is None or not Path(model_dir).is_dir():
        return []
    lookup = _reference_weights(model_dir)
    rows = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        is_gptq = hasattr(module, "qweight")  # GPTQ layers keep packed buffers, no weight
        if (weight is None and not is_gptq) or isinstance(module, torch.nn.Embedding) or name.endswith("norm"):
            continue
        if weight is not None and weight.dim() < 2 and not hasattr(weight, "quant_state"):
            continue
        ref = lookup(f"{name}.weight")
        if ref is None or ref.dim() != 2:
            continue
        approx = dequantize(name, module)
        if approx is None or approx.shape != ref.shape:
            continue
        rows.append(
            {"layer": name, "kind": layer_kind(name), "n_params": ref.numel(), "sqnr_db": sqnr_db(ref, approx.cpu())}
        )
    return rows


def reference_continuation(model: Any, tokenizer: Any) -> tuple[list[int], str]:
    enc = tokenizer(REFERENCE_PROMPT, return_tensors="pt").to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from rayq.host.decode import cache_kwargs

    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=REFERENCE_TOKENS, do_sample=False, pad_token_id=pad, **cache_kwargs(model)
        )
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)

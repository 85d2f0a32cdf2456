"""Unquantized precisions: the model's weights cast to one floating-point dtype."""

from __future__ import annotations

from typing import Any

from rayq.catalog.precisions import PrecisionInfo
from rayq.host.precisions.pretrained import from_pretrained

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load(info: PrecisionInfo, model_dir: str, device: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torch

    dtype = _DTYPES[info.name]
    return from_pretrained(model_dir, device, options, dtype=getattr(torch, dtype)), {"dtype": dtype}


def dequantize(module: Any) -> Any:
    weight = getattr(module, "weight", None)
    return None if weight is None else weight.detach().float()

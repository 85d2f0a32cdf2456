"""Unquantized precisions: the model's weights cast to one floating-point dtype."""

from __future__ import annotations

from typing import Any

from rayq.precisions import PrecisionInfo

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load(info: PrecisionInfo, model_dir: str, device: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, _DTYPES[info.name])
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        device_map=device,
        revision=options.get("revision"),
        trust_remote_code=bool(options.get("trust_remote_code", False)),
    )
    model.eval()
    return model, {"dtype": _DTYPES[info.name]}

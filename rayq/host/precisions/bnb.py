"""bitsandbytes precisions through transformers' BitsAndBytesConfig: LLM.int8 and 4-bit nf4/fp4.

Library defaults are kept (LLM.int8's outlier threshold stays 6.0; optimum-benchmark's
0.0 silently turns outlier handling off) and every setting used is returned, so it is
recorded with the results. 4-bit compute runs in bf16 on a GPU and fp32 on a CPU, where
bf16 matmuls are slow.
"""

from __future__ import annotations

import logging
from typing import Any

from rayq.catalog.precisions import PrecisionInfo
from rayq.host.precisions.pretrained import from_pretrained


def quantization_config(info: PrecisionInfo, device: str, options: dict[str, Any]) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if info.name == "bnb-int8":
        kw: dict[str, Any] = {"load_in_8bit": True}
        if "llm_int8_threshold" in options:
            kw["llm_int8_threshold"] = float(options["llm_int8_threshold"])
        return BitsAndBytesConfig(**kw)
    compute = options.get("compute_dtype") or ("bfloat16" if device.startswith("cuda") else "float32")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options["quant_type"],
        bnb_4bit_use_double_quant=bool(options["double_quant"]),
        bnb_4bit_compute_dtype=getattr(torch, compute),
    )


def load(info: PrecisionInfo, model_dir: str, device: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    # LLM.int8 on the CPU logs one cast warning per layer call (100k lines a run).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    qc = quantization_config(info, device, options)
    model = from_pretrained(model_dir, device, options, quantization_config=qc)
    settings = {k: v if isinstance(v, int | float | bool) else str(v) for k, v in qc.to_dict().items() if v is not None}
    return model, {"quantization_config": settings}


def weight_format(info: PrecisionInfo, settings: dict[str, Any]) -> tuple[str, float]:
    return f"{info.name} (bitsandbytes)", 8 * (info.bytes_per_param + info.scale_bytes_per_param)


def dequantize(module: Any) -> Any:
    """The float weight a bitsandbytes layer computes with (None for layers it cannot read)."""
    import bitsandbytes.functional as bnbf

    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    state = getattr(weight, "quant_state", None)
    if state is not None:
        if getattr(state, "packing_format_for_cpu", False):
            return None  # repacked for the CPU kernel by a forward pass: no longer the stored layout
        return bnbf.dequantize_4bit(weight.data, state).float()
    scb = getattr(weight, "SCB", None)
    if scb is not None:  # LLM.int8: int8 rows with one absmax scale each
        return weight.data.float() * scb.float()[:, None] / 127.0
    return weight.detach().float()

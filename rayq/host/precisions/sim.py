"""Simulated weight quantization: the unquantized model, each linear layer's weight rounded
to nearest in the scheme's format and dequantized in place (rayq.host.fake_quant).

No kernel runs the low-precision format, so speed and memory are the base dtype's; what is
measured is what the format does to the generations and the fidelity. The output layer
(lm_head) and the embeddings stay unquantized, as both founding studies keep them: often
they are one tied tensor, and quantizing it would change the embeddings too.
"""

from __future__ import annotations

from typing import Any

from rayq.catalog.precisions import PrecisionInfo
from rayq.catalog.schemes import describe
from rayq.host.precisions.pretrained import from_pretrained

KEEP = ("lm_head",)  # layers left unquantized: their weights here, their inputs in rayq.host.sim_quant


def base_dtype(device: str, options: dict[str, Any]) -> str:
    """float32 on a CPU (bf16 matmuls are slow there), bfloat16 on a GPU, unless the sweep says."""
    return options.get("dtype") or ("float32" if device == "cpu" else "bfloat16")


def load(info: PrecisionInfo, model_dir: str, device: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torch

    from rayq.host import fake_quant

    scheme = info.scheme
    assert scheme is not None and scheme.weights is not None
    dtype = base_dtype(device, options)
    model = from_pretrained(model_dir, device, options, dtype=getattr(torch, dtype))
    sym = options.get("sym")
    bits = 0.0
    n = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] in KEEP:
                continue
            w = module.weight
            w.copy_(fake_quant.fake_quantize(w, scheme.weights, scheme.weight_group, sym))
            per = fake_quant.bits_per_element(scheme.weights, scheme.weight_group, w.shape[-1], sym)
            bits += per * w.numel()
            n += w.numel()
    return model, {
        "dtype": dtype,
        "sym": sym,
        "weight_bits": bits / n if n else None,
        "quantized_params": n,
        "kept_unquantized": list(KEEP),
    }


def weight_format(info: PrecisionInfo, settings: dict[str, Any]) -> tuple[str, float | None]:

    assert info.scheme is not None
    return describe(info.scheme, settings.get("sym")), settings.get("weight_bits")


def dequantize(module: Any) -> Any:
    weight = getattr(module, "weight", None)
    return None if weight is None else weight.detach().float()

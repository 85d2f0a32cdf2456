"""The one place a precision family calls transformers' loader."""

from __future__ import annotations

from typing import Any


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

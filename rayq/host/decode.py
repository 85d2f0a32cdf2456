"""Generation of one completion with its timing: the paper's one-at-a-time protocol.

Sampling is seeded per completion (from its id), so the text does not depend on what ran
before it in the same process: a resumed sweep gives the same text as an uninterrupted one.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rayq.host.engine import Generated  # defined beside the engine protocol, torch-free
from rayq.planning.greedy import samples


class _FirstTokenClock(StoppingCriteria):
    """Called by `generate` after every decoding step; its first call marks the first token."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.first is None:
            self.first = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_kwargs(params: dict[str, Any], pad_token_id: int | None) -> dict[str, Any]:
    """Map a row's decoding parameters to `generate` arguments.

    Temperature 0 means greedy decoding (transformers refuses to sample at temperature 0);
    sampling arguments are left out when not sampling, so no library default is silently
    mixed in.
    """
    sample = samples(params)  # rayq.planning.greedy decides, for every decoder
    kw: dict[str, Any] = {
        "max_new_tokens": int(params["max_new_tokens"]),
        "do_sample": sample,
        "repetition_penalty": float(params["repetition_penalty"]),
        "pad_token_id": pad_token_id,
    }
    if sample:
        kw.update(temperature=float(params["temperature"]), top_k=int(params["top_k"]), top_p=float(params["top_p"]))
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    return kw


def cache_kwargs(model: Any) -> dict[str, Any]:
    """`past_key_values` when the precision's scheme quantizes the KV cache (rayq.host.sim_quant)."""
    if getattr(model, "_rayq_sim", None) is None:
        return {}
    from rayq.host.sim_quant import new_cache

    cache = new_cache(model)
    return {} if cache is None else {"past_key_values": cache}


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def generate_one(model: Any, tokenizer: Any, prompt: str, params: dict[str, Any], seed: int) -> Generated:
    device = model.device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    n_prompt = int(enc["input_ids"].shape[1])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    clock = _FirstTokenClock()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    sync_device(device)
    start = time.perf_counter()
    kw = generate_kwargs(params, pad) | cache_kwargs(model)
    with torch.inference_mode():
        out = model.generate(**enc, **kw, stopping_criteria=StoppingCriteriaList([clock]))
    sync_device(device)
    end = time.perf_counter()
    new = out[0, n_prompt:]
    return Generated(
        text=tokenizer.decode(new, skip_special_tokens=True),
        n_prompt_tokens=n_prompt,
        n_new_tokens=int(new.shape[0]),
        latency_s=end - start,
        ttft_s=(clock.first - start) if clock.first is not None else None,
        peak_memory_mb=peak_memory_mb(device),
    )

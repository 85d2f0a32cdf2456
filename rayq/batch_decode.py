"""Batched generation with per-row sampling parameters, over the model's own forward and KV cache.

Decoding at batch 1 is bound by memory bandwidth (every weight is read for each token), so
a batch of rows costs little more per step than one. `generate` cannot give each row its
own temperature, top_k, top_p, max_new_tokens and random stream, so this is a short
sampling loop of our own around the unchanged transformers model:

- prompts are left-padded; position ids follow the attention mask, so a row's logits do
  not depend on how much padding the batch gave it (up to float rounding);
- each row draws from its own `torch.Generator`, seeded from its completion id, by
  inverse-CDF sampling (one uniform number per step), so its text does not depend on what
  else is in the batch;
- a row that ends (end-of-sequence or its own max_new_tokens) stops there: its latency stops
  at the step it ended, and once an eighth of the batch has ended those rows leave it (their
  slots of the KV cache are dropped), so a mix of lengths or early end-of-sequence does not
  keep decoding dead rows. Sorting a chunk by max_new_tokens before batching keeps each batch
  to similar lengths. A quantized KV cache (rayq.sim_quant, QuantizedCache) keeps its rows
  masked instead: its layers are not plain tensors to slice.

The order of the sampling steps is transformers': repetition penalty, temperature, top_k,
top_p. Temperature 0 or do_sample false means greedy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from rayq.decode import Generated, cache_kwargs, peak_memory_mb, sync_device


@dataclass(frozen=True)
class Row:
    prompt: str
    params: dict[str, Any]
    seed: int


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list | tuple) else [int(eos)]


def _apply_repetition_penalty(logits: torch.Tensor, seqs: list[list[int]], penalty: list[float]) -> None:
    for i, p in enumerate(penalty):
        if p == 1.0 or not seqs[i]:
            continue
        ids = torch.tensor(sorted(set(seqs[i])), device=logits.device)
        score = logits[i, ids]
        logits[i, ids] = torch.where(score < 0, score * p, score / p)


def choose_tokens(
    logits: torch.Tensor,
    sample: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Pick one token per row: argmax where `sample` is false, else top-k/top-p sampling.

    `uniforms` holds one U(0,1) draw per row from that row's own generator.
    """
    greedy = logits.argmax(dim=-1)
    if not bool(sample.any()):
        return greedy
    temp = torch.where(sample, temperature, torch.ones_like(temperature)).clamp_min(1e-6)
    scaled = logits / temp[:, None]
    # Only the largest top_k logits can be drawn, so a partial sort suffices (a full sort of
    # the vocabulary every step costs more than the sampling itself on a CPU).
    k = int(torch.where(sample, top_k, torch.ones_like(top_k)).max().clamp(1, logits.shape[-1]))
    sorted_logits, sorted_idx = scaled.topk(k, dim=-1, sorted=True)
    ranks = torch.arange(k, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass ranked above each token
    probs = probs.masked_fill((before >= top_p[:, None]) & (ranks > 0), 0.0)
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target).clamp_max(k - 1)
    sampled = sorted_idx.gather(1, pick).squeeze(1)
    return torch.where(sample, sampled, greedy)


def _sliceable(cache: Any) -> bool:
    """Whether rows can leave `cache`: transformers' plain dynamic cache, whose layers are tensors."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    return type(cache) is DynamicCache and all(
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers
    )


def generate_batch(model: Any, tokenizer: Any, rows: list[Row]) -> list[Generated]:
    device = model.device
    n = len(rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = tokenizer([r.prompt for r in rows], return_tensors="pt", padding=True, padding_side="left")
    input_ids = enc["input_ids"].to(device)
    attn = enc["attention_mask"].to(device)
    n_prompt = attn.sum(dim=-1).tolist()
    eos = set(_eos_ids(model, tokenizer))

    def col(key: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([r.params[key] for r in rows], dtype=dtype, device=device)

    sample = torch.tensor([bool(r.params["do_sample"]) and r.params["temperature"] > 0 for r in rows], device=device)
    temperature, top_k, top_p = col("temperature", torch.float32), col("top_k", torch.long), col("top_p", torch.float32)
    penalty = [float(r.params["repetition_penalty"]) for r in rows]
    max_new = [int(r.params["max_new_tokens"]) for r in rows]
    gens = [torch.Generator().manual_seed(r.seed) for r in rows]
    seqs: list[list[int]] = [input_ids[i, attn[i].bool()].tolist() for i in range(n)]
    new: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    ended_at: list[float] = [0.0] * n

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync_device(device)
    start = time.perf_counter()
    first: float | None = None
    position_ids = (attn.cumsum(dim=-1) - 1).clamp_min(0)
    slots = list(range(n))  # the row in each position of the batch
    step_input = input_ids
    cache: Any = cache_kwargs(model).get("past_key_values")  # None: the model makes its own
    with torch.inference_mode():
        for _step in range(max(max_new)):
            out = model(
                input_ids=step_input,
                attention_mask=attn,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,  # only the last position's logits are needed
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            _apply_repetition_penalty(logits, [seqs[i] for i in slots], [penalty[i] for i in slots])
            uniforms = torch.stack([torch.rand((), generator=gens[i]) for i in slots]).to(device)
            tokens = choose_tokens(logits, sample, temperature, top_k, top_p, uniforms).tolist()
            sync_device(device)
            now = time.perf_counter()
            if first is None:
                first = now
            for pos, tok in enumerate(tokens):
                i = slots[pos]
                if done[i]:
                    tokens[pos] = pad_id
                    continue
                new[i].append(tok)
                seqs[i].append(tok)
                if tok in eos or len(new[i]) >= max_new[i]:
                    done[i] = True
                    ended_at[i] = now
            if all(done):
                break
            step_input = torch.tensor(tokens, device=device)[:, None]
            attn = torch.cat([attn, attn.new_ones((len(slots), 1))], dim=-1)
            position_ids = position_ids[:, -1:] + 1
            ended = sum(done[i] for i in slots)
            if ended and ended >= len(slots) // 8 and _sliceable(cache):  # the ended rows leave the batch
                keep = [pos for pos, i in enumerate(slots) if not done[i]]
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                step_input, attn, position_ids = step_input[idx], attn[idx], position_ids[idx]
                sample, temperature, top_k, top_p = sample[idx], temperature[idx], top_k[idx], top_p[idx]
                slots = [slots[pos] for pos in keep]
    peak = peak_memory_mb(device)
    ttft = (first - start) if first is not None else None
    return [
        Generated(
            text=tokenizer.decode(new[i], skip_special_tokens=True),
            n_prompt_tokens=int(n_prompt[i]),
            n_new_tokens=len(new[i]),
            latency_s=ended_at[i] - start,
            ttft_s=ttft,
            peak_memory_mb=peak,
        )
        for i in range(n)
    ]

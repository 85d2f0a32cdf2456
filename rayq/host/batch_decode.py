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
  slots of the KV cache are dropped), so early ends do not keep decoding dead rows;
- rows beyond `batch_size` wait and join as others leave: their prompts run as one prefill
  and their KV caches are left-padded to the running batch's length (the attention mask hides
  the padding), so a mix of lengths keeps the batch full instead of finishing half empty.
  Sorting the rows by max_new_tokens before batching keeps the padding short.
- a quantized KV cache (rayq.host.sim_quant, QuantizedCache) is not plain tensors to slice or pad:
  its ended rows stay masked and waiting rows start a new batch when the last row ends.

The order of the sampling steps is transformers': repetition penalty, temperature, top_k,
top_p. Temperature 0 or do_sample false means greedy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from rayq.host.decode import Generated, cache_kwargs, peak_memory_mb, sync_device
from rayq.planning.greedy import samples


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


def _joinable(cache: Any) -> bool:
    """Whether rows can join `cache`: full-attention layers only (a sliding window's tensors are
    trimmed to the window, so they cannot be padded to a common length)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(
        type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers
    )


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """`t` ([batch, heads, seq, dim]) grown to `length` positions by zeros on the left (masked out)."""
    short = length - t.shape[-2]
    return t if short == 0 else torch.cat([t.new_zeros((*t.shape[:-2], short, t.shape[-1])), t], dim=-2)


def _pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros((mask.shape[0], length - mask.shape[1])), mask], dim=1)


@dataclass(eq=False)
class _RowState:
    """One row's decoding so far, kept together so that a row's slot in the batch can change
    (rows leave and join) without its history moving.

    Its own generator, seeded from the row, is what keeps its text independent of the batch.
    """

    row: Row
    sample: bool
    penalty: float
    max_new: int
    generator: torch.Generator
    seq: list[int] = field(default_factory=list)  # prompt then new tokens: what the repetition penalty sees
    new: list[int] = field(default_factory=list)
    n_prompt: int = 0
    done: bool = False
    started_at: float = 0.0
    first_at: float = 0.0
    done_at: float = 0.0

    @classmethod
    def of(cls, row: Row) -> _RowState:
        p = row.params
        sample = samples(p)
        gen = torch.Generator().manual_seed(row.seed)
        return cls(row, sample, float(p["repetition_penalty"]), int(p["max_new_tokens"]), gen)

    def start(self, prompt_ids: list[int], now: float) -> None:
        self.seq, self.n_prompt, self.started_at = prompt_ids, len(prompt_ids), now

    def record(self, token: int, now: float, eos: set[int]) -> bool:
        """Whether the row ended with `token`: its latency stops at the step that chose it."""
        if not self.new:
            self.first_at = now
        self.new.append(token)
        self.seq.append(token)
        if token in eos or len(self.new) >= self.max_new:
            self.done, self.done_at = True, now
            return True
        return False

    def result(self, tokenizer: Any, device: torch.device) -> Generated:
        return Generated(
            text=tokenizer.decode(self.new, skip_special_tokens=True),
            n_prompt_tokens=self.n_prompt,
            n_new_tokens=len(self.new),
            latency_s=self.done_at - self.started_at,
            ttft_s=self.first_at - self.started_at,
            peak_memory_mb=peak_memory_mb(device),
        )


@dataclass(eq=False)
class _Batch:
    """The rows being decoded together: their KV cache and the inputs of their next step.

    Invariant between steps: `attn` covers the cache plus the next input token; `position_ids`
    and `step_input` hold that token's position and id, one row per slot.
    """

    slots: list[int]  # row index of each slot
    cache: Any
    attn: torch.Tensor
    position_ids: torch.Tensor
    step_input: torch.Tensor
    knobs: tuple[torch.Tensor, ...]  # choose_tokens' sample, temperature, top_k, top_p, one per slot

    def fed(self, tokens: list[int], device: torch.device) -> None:
        """Restore the invariant after a step whose chosen tokens are `tokens`."""
        self.step_input = torch.tensor(tokens, device=device)[:, None]
        self.attn = torch.cat([self.attn, self.attn.new_ones((len(self.slots), 1))], dim=-1)
        self.position_ids = self.position_ids + 1

    def keep(self, keep: list[int]) -> None:
        """Only the rows at positions `keep` stay; padding columns no row needs any more go too."""
        idx = torch.tensor(keep, device=self.attn.device)
        self.cache.batch_select_indices(idx)
        self.attn, self.position_ids, self.step_input = self.attn[idx], self.position_ids[idx], self.step_input[idx]
        self.knobs = tuple(k[idx] for k in self.knobs)
        self.slots = [self.slots[pos] for pos in keep]
        self._trim_padding()

    def _trim_padding(self) -> None:
        """Leading columns that are padding in every row cost attention time at every step but
        change nothing (they are masked), so a cache whose tensors can be sliced drops them."""
        unused = int((self.attn.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading all-padding columns
        if unused and _joinable(self.cache):
            self.attn = self.attn[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]

    def join(self, other: _Batch) -> None:
        """Append `other`'s rows, both caches left-padded to the longer one."""
        length = max(self.attn.shape[1], other.attn.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                setattr(mine, name, torch.cat([_left_pad(a, length - 1), _left_pad(b, length - 1)], dim=0))
        self.attn = torch.cat([_pad_mask(self.attn, length), _pad_mask(other.attn, length)], dim=0)
        self.position_ids = torch.cat([self.position_ids, other.position_ids], dim=0)
        self.step_input = torch.cat([self.step_input, other.step_input], dim=0)
        self.knobs = tuple(torch.cat([a, b], dim=0) for a, b in zip(self.knobs, other.knobs, strict=True))
        self.slots = self.slots + other.slots


class _Decoder:
    """iter_batch's state between steps: every row's progress, the rows still waiting, the running
    batch. Kept out of the generator, which holds only the loop, so that its yields happen outside
    torch.inference_mode."""

    def __init__(
        self, model: Any, tokenizer: Any, rows: list[Row], batch_size: int | None, started: set[int] | None
    ) -> None:
        self.model, self.tokenizer, self.started = model, tokenizer, started
        self.device = model.device
        n = len(rows)
        self.cap = n if batch_size is None else max(1, min(int(batch_size), n))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos = set(_eos_ids(model, tokenizer))
        self.rows = [_RowState.of(r) for r in rows]
        self.waiting = list(range(n))
        self.batch: _Batch | None = None

    def advance(self) -> list[int] | None:
        """One step: rows join (their prefill) or the batch decodes a token. The rows that ended
        in it; None when nothing is left."""
        self._retire()
        ended = self._admit()
        if ended is not None:
            return ended
        if self.batch is None:
            return None
        return self._step(self.batch)

    def result(self, i: int) -> Generated:
        return self.rows[i].result(self.tokenizer, self.device)

    def _live(self, batch: _Batch) -> list[int]:
        return [pos for pos, i in enumerate(batch.slots) if not self.rows[i].done]

    def _retire(self) -> None:
        """Ended rows leave only once an eighth of the batch has ended, so the cache is not sliced
        at every step; a cache that cannot be sliced keeps them, masked, until all have ended."""
        batch = self.batch
        if batch is None:
            return
        live = self._live(batch)
        if not live:  # every row ended: the cache goes with them
            self.batch = None
        elif len(batch.slots) - len(live) >= max(1, len(batch.slots) // 8) and _sliceable(batch.cache):
            batch.keep(live)  # the ended rows leave the batch

    def _can_admit(self, free: int) -> bool:
        """Waiting rows join only when an eighth of the batch is free, so the cache is not padded
        and joined for one row at a time; a cache that cannot be padded waits until it is empty."""
        if not self.waiting:
            return False
        batch = self.batch
        return batch is None or (free >= max(1, self.cap // 8) and _joinable(batch.cache))

    def _admit(self) -> list[int] | None:
        """Prefill waiting rows into the free slots: the rows that ended on their first token;
        None when none joined."""
        batch = self.batch
        free = self.cap - (0 if batch is None else len(batch.slots))
        if not self._can_admit(free):
            return None
        joining, self.waiting = self.waiting[:free], self.waiting[free:]
        fresh, ended = self._prefill(joining)
        if batch is None:
            self.batch = fresh
        elif len(ended) < len(joining):
            if ended:
                fresh.keep(self._live(fresh))
            batch.join(fresh)
        return ended

    def _prefill(self, ids: list[int]) -> tuple[_Batch, list[int]]:
        """Run the prompts of rows `ids` (left-padded) and choose their first tokens."""
        if self.started is not None:
            self.started.update(ids)
        prompts = [self.rows[i].row.prompt for i in ids]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        input_ids, attn = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        sync_device(self.device)
        now = time.perf_counter()
        for pos, i in enumerate(ids):
            self.rows[i].start(input_ids[pos, attn[pos].bool()].tolist(), now)
        position_ids = (attn.cumsum(dim=-1) - 1).clamp_min(0)
        # past_key_values None: the model makes its own cache
        out = self._forward(input_ids, attn, position_ids, cache_kwargs(self.model).get("past_key_values"))
        knobs = self._knobs(ids)
        tokens, ended = self._take(ids, out.logits[:, -1, :].float(), knobs)
        fresh = _Batch(
            ids,
            out.past_key_values,
            torch.cat([attn, attn.new_ones((len(ids), 1))], dim=-1),
            position_ids[:, -1:] + 1,
            torch.tensor(tokens, device=self.device)[:, None],
            knobs,
        )
        return fresh, ended

    def _step(self, batch: _Batch) -> list[int]:
        out = self._forward(batch.step_input, batch.attn, batch.position_ids, batch.cache)
        batch.cache = out.past_key_values
        tokens, ended = self._take(batch.slots, out.logits[:, -1, :].float(), batch.knobs)
        batch.fed(tokens, self.device)
        return ended

    def _forward(self, input_ids: torch.Tensor, attn: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> Any:
        return self.model(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits are needed
        )

    def _knobs(self, ids: list[int]) -> tuple[torch.Tensor, ...]:
        def col(key: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([self.rows[i].row.params[key] for i in ids], dtype=dtype, device=self.device)

        sample = torch.tensor([self.rows[i].sample for i in ids], device=self.device)
        return sample, col("temperature", torch.float32), col("top_k", torch.long), col("top_p", torch.float32)

    def _take(
        self, slots: list[int], logits: torch.Tensor, knobs: tuple[torch.Tensor, ...]
    ) -> tuple[list[int], list[int]]:
        """Choose and record each slot's next token (pad where its row has ended): (tokens, rows ended now).

        An ended row still draws from its own generator (its stream no longer matters), so that
        choose_tokens gets one draw per slot."""
        rows = [self.rows[i] for i in slots]
        _apply_repetition_penalty(logits, [r.seq for r in rows], [r.penalty for r in rows])
        uniforms = torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(self.device)
        tokens = choose_tokens(logits, *knobs, uniforms).tolist()
        sync_device(self.device)
        now = time.perf_counter()
        ended = []
        for pos, (i, row) in enumerate(zip(slots, rows, strict=True)):
            if row.done:
                tokens[pos] = self.pad_id
            elif row.record(tokens[pos], now, self.eos):
                ended.append(i)
        return tokens, ended


def generate_batch(model: Any, tokenizer: Any, rows: list[Row], batch_size: int | None = None) -> list[Generated]:
    """`rows`' outputs in their order (see iter_batch)."""
    out = dict(iter_batch(model, tokenizer, rows, batch_size))
    return [out[i] for i in range(len(rows))]


def iter_batch(
    model: Any, tokenizer: Any, rows: list[Row], batch_size: int | None = None, started: set[int] | None = None
) -> Iterator[tuple[int, Generated]]:
    """(row index, output) for each row as it ends.

    At most `batch_size` rows (default: all) decode at once; the others wait in order and join
    the batch as rows end (their prompts are run together, their caches left-padded to the
    batch's), so a mix of lengths keeps the batch full. A caller that stops on an exception (out
    of memory) keeps what was yielded before it; `started` (if given) collects the rows whose
    prompts have run, so it can tell the rows in flight from those still waiting.
    """
    decoder = _Decoder(model, tokenizer, rows, batch_size, started)
    if decoder.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(decoder.device)
    while True:
        with torch.inference_mode():  # not across the yield: the caller's code runs outside it
            ended = decoder.advance()
            done_now = [] if ended is None else [(i, decoder.result(i)) for i in ended]
        if ended is None:
            return
        yield from done_now

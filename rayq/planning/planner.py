"""Expand a validated sweep into completions with stable ids, grouped into blocks.

A *block* is the unit of work one Tune trial sends to one model host: every completion of
one (model, precision) that shares the values of `runtime.block_by`. Tune's overhead is
per trial (0.35 trials/s with defaults here, ~19/s tuned), so a trial must carry many
completions; the ids, not Tune's state, decide what is done.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from rayq.catalog.hosts import HostKey
from rayq.planning.greedy import greedy_key, is_greedy  # is_greedy: planner.is_greedy, as before
from rayq.planning.spec import GRID_DEFAULTS, ModelSpec, Sweep


@dataclass(frozen=True, slots=True)
class Completion:
    completion_id: str
    block_id: str
    model: str
    precision: str
    prompt_id: int
    prompt: str
    params: tuple[tuple[str, Any], ...]  # every grid parameter, in GRID_DEFAULTS order
    seed: int
    sampling_seed: int
    protocol: str | None = None  # "serial": in the serial timing sample (runtime.serial_sample); None: the host's

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = dict(self.params)
        return d


@dataclass(frozen=True, slots=True)
class Group:
    """One (model, precision) pair: one model host actor."""

    model: ModelSpec
    precision: str
    block_ids: tuple[str, ...]
    n_completions: int

    @property
    def host(self) -> HostKey:
        return HostKey(self.model.name, self.precision)

    @property
    def key(self) -> str:
        """The host key's text, "model/precision" (rayq.catalog.hosts)."""
        return str(self.host)


def completion_id(
    model: ModelSpec,
    precision: str,
    prompt: str,
    params: dict[str, Any],
    seed: int,
    precision_options: dict[str, Any] | None = None,
    engine: str = "transformers",
) -> str:
    """A hash of everything that determines the text, and nothing that does not.

    The sweep name and file are left out on purpose: the same completion in two sweep
    files is the same work, and renaming a sweep must not orphan its results.
    """
    key = {
        "model": model.name,
        "revision": model.revision,
        "precision": precision,
        "prompt": prompt,
        "params": {k: params[k] for k in sorted(params)},
        "seed": seed,
    }
    if precision_options:  # only when set, so sweeps using library defaults keep their ids
        key["precision_options"] = {k: precision_options[k] for k in sorted(precision_options)}
    if engine != "transformers":  # another engine's texts differ for the same seed; old ids stay as they were
        key["engine"] = engine
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def sampling_seed(cid: str) -> int:
    """The torch seed of a completion, derived from its id so a rerun samples the same tokens."""
    return int(cid[:12], 16)


def grid_values(sweep: Sweep) -> dict[str, list[Any]]:
    grid = sweep.spec.grid
    return {k: list(getattr(grid, k)) for k in GRID_DEFAULTS}


def block_key(params: dict[str, Any], block_by: list[str]) -> str:
    return ",".join(f"{k}={params[k]}" for k in block_by) or "all"


def block_id(group_key: str, params: dict[str, Any], block_by: list[str]) -> str:
    return f"{group_key}|{block_key(params, block_by)}"


def split_block_id(bid: str) -> tuple[str, str, str]:
    """(group key, model, precision) of a block id made by `block_id`."""
    group_key = bid.split("|", 1)[0]
    host = HostKey.parse(group_key)
    return group_key, host.model, host.precision


def _param_dicts(grid: dict[str, list[Any]], keys: list[str]) -> Iterator[dict[str, Any]]:
    for combo in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, combo, strict=True))


def iter_completions(
    sweep: Sweep, model: ModelSpec, precision: str, only_block: str | None = None
) -> Iterator[Completion]:
    """Completions of one group, block by block (a block's completions are contiguous);
    with `only_block`, just that block's, without hashing the rest of the group."""
    spec = sweep.spec
    grid = grid_values(sweep)
    block_by = list(spec.runtime.block_by)
    inner = [k for k in GRID_DEFAULTS if k not in block_by]
    group_key = str(HostKey(model.name, precision))
    options = spec.precision_options.get(precision)
    engine = spec.engine_of(model)
    for outer in _param_dicts(grid, block_by):
        bid = block_id(group_key, outer, block_by)
        if only_block is not None and bid != only_block:
            continue
        for rest in _param_dicts(grid, inner):
            params = {k: {**outer, **rest}[k] for k in GRID_DEFAULTS}
            ptuple = tuple(params.items())
            n = 0 if in_serial_sample(params, grid, spec.runtime.serial_sample_by) else spec.runtime.serial_sample
            for prompt_id, prompt in enumerate(sweep.prompt_texts):
                for seed in spec.seed_values:
                    cid = completion_id(model, precision, prompt, params, seed, options, engine)
                    protocol = "serial" if n < spec.runtime.serial_sample else None
                    n += 1
                    yield Completion(
                        cid, bid, model.name, precision, prompt_id, prompt, ptuple, seed, sampling_seed(cid), protocol
                    )


def in_serial_sample(params: dict[str, Any], grid: dict[str, list[Any]], by: list[str] | None) -> bool:
    """Whether a grid combination holds a cell's serial sample (runtime.serial_sample): every
    combination when cells are whole combinations, else the one at the first value of each
    parameter outside `by`. Its first completions (first prompts, then seeds) are the sample."""
    return by is None or all(params[k] == grid[k][0] for k in GRID_DEFAULTS if k not in by)


def groups(sweep: Sweep) -> list[Group]:
    spec = sweep.spec
    grid = grid_values(sweep)
    block_by = list(spec.runtime.block_by)
    per_block = len(sweep.prompt_texts) * len(spec.seed_values)
    for k in GRID_DEFAULTS:
        if k not in block_by:
            per_block *= len(grid[k])
    out = []
    for model in spec.models:
        for precision in spec.precisions:
            key = str(HostKey(model.name, precision))
            bids = tuple(block_id(key, p, block_by) for p in _param_dicts(grid, block_by))
            out.append(Group(model, precision, bids, per_block * len(bids)))
    return out


def total_completions(sweep: Sweep) -> int:
    return sum(g.n_completions for g in groups(sweep))


def block_tokens(sweep: Sweep) -> dict[str, int]:
    """The most tokens each block can generate (the sum of its completions' max_new_tokens),
    from the grid alone: pricing the Roy sweep must not expand its 264,600 completions."""
    spec = sweep.spec
    grid = grid_values(sweep)
    block_by = list(spec.runtime.block_by)
    inner = [k for k in GRID_DEFAULTS if k not in block_by]
    per_cell = len(sweep.prompt_texts) * len(spec.seed_values)
    others = math.prod(len(grid[k]) for k in inner if k != "max_new_tokens")
    out: dict[str, int] = {}
    for g in groups(sweep):
        for outer in _param_dicts(grid, block_by):
            lengths = [outer["max_new_tokens"]] if "max_new_tokens" in outer else grid["max_new_tokens"]
            out[block_id(g.key, outer, block_by)] = per_cell * others * sum(lengths)
    return out


@dataclass(frozen=True)
class Work:
    """The planned ids minus the ids on disk: what a (resumed) run still has to do."""

    planned: int
    planned_ids: frozenset[str]
    done_before: int
    remaining: dict[str, list[str] | None]  # block id -> ids left (None: the whole block)
    tokens: dict[str, int] = field(default_factory=dict)  # block id -> most tokens its remaining ids can generate
    prompt_of: dict[str, int] = field(default_factory=dict)  # planned id -> its prompt_id


def remaining_work(sweep: Sweep, done: set[str]) -> Work:
    planned_ids: set[str] = set()
    by_block: dict[str, list[str]] = {}
    block_sizes: dict[str, int] = {}
    tokens: dict[str, int] = {}
    prompt_of: dict[str, int] = {}
    for g in groups(sweep):
        for c in iter_completions(sweep, g.model, g.precision):
            planned_ids.add(c.completion_id)
            prompt_of[c.completion_id] = c.prompt_id
            block_sizes[c.block_id] = block_sizes.get(c.block_id, 0) + 1
            if c.completion_id not in done:
                by_block.setdefault(c.block_id, []).append(c.completion_id)
                # params follow GRID_DEFAULTS' order, which starts with max_new_tokens
                tokens[c.block_id] = tokens.get(c.block_id, 0) + c.params[0][1]
    remaining: dict[str, list[str] | None] = {
        bid: None if len(ids) == block_sizes[bid] else ids for bid, ids in by_block.items()
    }
    return Work(len(planned_ids), frozenset(planned_ids), len(done & planned_ids), remaining, tokens, prompt_of)


def left_per_group(groups_: list[Group], work: Work) -> dict[str, int]:
    """Completions not on disk yet, per host (group key), from `work`'s remaining blocks."""
    left = {}
    for g in groups_:
        per_block = g.n_completions // max(1, len(g.block_ids))  # the blocks of a sweep have one size
        todo = [work.remaining[b] for b in g.block_ids if b in work.remaining]
        left[g.key] = sum(per_block if ids is None else len(ids) for ids in todo)
    return left


@dataclass(frozen=True)
class DecodeWork:
    """How a group's completions are decoded: how many serially (the timing sample, or all under
    protocol serial), how many copy another greedy row's output, and how many batched."""

    total: int
    serial: int
    shared: int

    @property
    def batched(self) -> int:
        return self.total - self.serial - self.shared


def decode_work(sweep: Sweep) -> DecodeWork:
    """`DecodeWork` of one group (every group of a sweep has the same grid), from the grid alone."""
    spec = sweep.spec
    rt = spec.runtime
    grid = grid_values(sweep)
    n_prompts, n_seeds = len(sweep.prompt_texts), len(spec.seed_values)
    per_cell = n_prompts * n_seeds
    total = serial = greedy_rows = 0
    keys: set[tuple[Any, ...]] = set()
    for params in _param_dicts(grid, list(GRID_DEFAULTS)):
        total += per_cell
        sampled = in_serial_sample(params, grid, rt.serial_sample_by)
        timed = min(rt.serial_sample, per_cell) if sampled else 0  # 0 under protocol serial (rayq.planning.spec)
        serial += timed
        if rt.share_greedy and is_greedy(params):
            for i in range(per_cell):  # a cell's rows go prompt by prompt, then seed (iter_completions)
                protocol = "serial" if i < timed else None
                row = {"prompt": sweep.prompt_texts[i // n_seeds], "params": params, "protocol": protocol}
                key = greedy_key(row)  # the host's own key (rayq.planning.greedy)
                if key is not None:
                    greedy_rows += 1
                    keys.add(key)
    shared = greedy_rows - len(keys)
    if rt.protocol == "serial":  # every row decoded is serial
        serial = total - shared
    return DecodeWork(total, serial, shared)

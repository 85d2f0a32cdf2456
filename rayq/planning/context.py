"""A model's context length, and the check that each prompt plus max_new_tokens fits in it.

A model with rotary positions runs past its context without an error, and a row past the
trained length still says `ok`, with text from positions the model never saw in training. So
`rayq plan` and `rayq run` refuse such a sweep unless it is allowed, and every row records
whether it ran past (`past_context`, set by the model host).

Counting prompt tokens needs the tokenizer, and importing transformers alone takes seconds,
which `rayq plan` on a sweep that fits should not pay. So each prompt is first bounded without
it (rayq.planning.tokens.prompt_token_bound: the UTF-8 bytes of the normalized text plus the few
tokens a tokenizer adds; the memory estimate sizes the KV cache with the same bound). Only a
model where that bound does not already prove the fit loads its tokenizer, from this machine
only, to count exactly.

Imports neither torch nor transformers unless a tokenizer is needed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayq.catalog.bundled import BUNDLED_CONFIG, BUNDLED_CONTEXT, bundled_gguf, cache_dir
from rayq.planning.spec import ModelSpec, SpecError, Sweep
from rayq.planning.tokens import ADDED_TOKENS, prompt_token_bound  # noqa: F401 (ADDED_TOKENS: context's name, as before)

# The config keys that hold the context length, in order of preference (GPT-2 says n_positions,
# MPT max_seq_len, ChatGLM and Qwen-1 seq_length, older ports n_ctx).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
HOW_TO_ALLOW = "allow it with --allow-past-context (runtime.allow_past_context: true)"


class ContextError(SpecError):
    """Prompts plus max_new_tokens past a model's context length, and the sweep did not allow it."""


@dataclass(frozen=True)
class ContextOverflow:
    """One prompt and one max_new_tokens value that together run past one model's context."""

    model: str
    model_index: int
    prompt_id: int
    prompt_tokens: int
    max_new_tokens: int
    context: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.max_new_tokens


@dataclass(frozen=True)
class ModelCheck:
    """What the check found for one model of the sweep."""

    model: str
    model_index: int
    context: int | None  # None: unknown here, so nothing was checked
    longest_prompt: int  # tokens: counted where the tokenizer was loaded, else the upper bound
    counted: bool  # whether longest_prompt was counted by the tokenizer (else it is a bound)
    max_new_tokens: int  # the largest in the grid
    overflows: tuple[ContextOverflow, ...]
    unchecked: str | None = None  # why some prompts could not be checked, when they could not


def context_from_config(config: Mapping[str, Any]) -> int | None:
    """The context length in a model's config (as a dict), or None when it names none.

    A multimodal config keeps the language model's settings under `text_config`, which is
    the part that generates, so it is read first.
    """
    for cfg in (config.get("text_config"), config):
        if isinstance(cfg, Mapping):
            for key in CONTEXT_KEYS:
                v = cfg.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    return None


def _hub_cached(model: ModelSpec, filename: str) -> Path | None:
    """A file of a hub model from the local Hugging Face cache; never the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    assert model.hub is not None
    found = try_to_load_from_cache(model.hub, filename, revision=model.revision)
    return Path(found) if isinstance(found, str) else None


def _local_config(model: ModelSpec) -> dict[str, Any] | None:
    if model.path is not None:
        file: Path | None = Path(model.path) / "config.json"
    elif model.hub is not None:
        file = _hub_cached(model, "config.json")
    else:
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8")) if file is not None else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_config(model: ModelSpec) -> dict[str, Any] | None:
    """The model's config (as a dict) for checks that must not load weights nor download: a
    local directory's, a hub model's from the local cache, the bundled model's layer sizes
    (read before its GGUF file is converted); None when none of them is on this machine."""
    if model.bundled is not None:
        return dict(BUNDLED_CONFIG[model.bundled])
    return _local_config(model)


def model_context(model: ModelSpec) -> int | None:
    """The model's context length in tokens as known on this machine without the network.

    From its config (a local directory's, or a hub model's in the local cache), the bundled
    model's known value, else the sweep's `size.context`; None when none of them says.
    """
    if model.bundled is not None:
        return BUNDLED_CONTEXT[model.bundled]
    config = _local_config(model)
    found = context_from_config(config) if config is not None else None
    if found is None and model.size is not None:
        found = model.size.context
    return found


def bundled_tokenizer(name: str) -> Any:
    """The bundled model's tokenizer without its weights: from the converted copy if there, else the GGUF."""
    from transformers import AutoTokenizer

    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return AutoTokenizer.from_pretrained(str(target))
    gguf = bundled_gguf(name)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _load_tokenizer(model: ModelSpec) -> Any:
    """The tokenizer the model host will use, from this machine only (transformers is imported here)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # `rayq plan` prints its own lines only
    try:
        if model.bundled is not None:
            return bundled_tokenizer(model.bundled)
        where = model.path if model.path is not None else model.hub
        return AutoTokenizer.from_pretrained(
            where, revision=model.revision, trust_remote_code=model.trust_remote_code, local_files_only=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def count_prompt_tokens(model: ModelSpec, texts: Sequence[str]) -> list[int]:
    """Each text's token count as the model host feeds it (the tokenizer's special tokens included).

    Raises whatever loading the tokenizer raises (OSError when it is not on this machine).
    """
    tokenizer = _load_tokenizer(model)
    return [len(ids) for ids in tokenizer(list(texts))["input_ids"]]


def check_model(sweep: Sweep, index: int) -> ModelCheck:
    model = sweep.spec.models[index]
    lengths = sorted(sweep.spec.grid.max_new_tokens)
    longest_new = lengths[-1]
    context = model_context(model)
    bounds = [prompt_token_bound(t) for t in sweep.prompt_texts]
    if context is None:
        return ModelCheck(model.name, index, None, max(bounds), False, longest_new, ())
    unsure = [i for i, b in enumerate(bounds) if b + longest_new > context]
    tokens: dict[int, int] = {}
    unchecked = None
    if unsure:
        try:
            counts = count_prompt_tokens(model, [sweep.prompt_texts[i] for i in unsure])
            tokens = dict(zip(unsure, counts, strict=True))
        except Exception as e:  # noqa: BLE001 - no tokenizer here: say so, do not refuse on a bound
            if model.hub is not None and isinstance(e, OSError):
                why = "its tokenizer is not in the local Hugging Face cache (the check downloads nothing)"
            else:
                first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
                why = f"its tokenizer did not load: {type(e).__name__}: {first}"
            unchecked = f"{len(unsure)} of its prompts may run past it, uncounted: {why}"
    overflows = tuple(
        ContextOverflow(model.name, index, i, n, m, context)
        for i, n in sorted(tokens.items())
        for m in lengths
        if n + m > context
    )
    sizes = [tokens.get(i, b) for i, b in enumerate(bounds)]
    longest = max(range(len(sizes)), key=lambda i: (sizes[i], i in tokens))
    return ModelCheck(model.name, index, context, sizes[longest], longest in tokens, longest_new, overflows, unchecked)


def check_models(sweep: Sweep) -> list[ModelCheck]:
    return [check_model(sweep, i) for i in range(len(sweep.spec.models))]


def check_context(sweep: Sweep) -> list[ContextOverflow]:
    """Every (model, prompt, max_new_tokens) of the sweep that runs past that model's context."""
    return [o for c in check_models(sweep) for o in c.overflows]


def describe_overflows(overflows: Sequence[ContextOverflow]) -> str:
    """One line: each model's worst prompt/length pair, and how many more there are."""
    by_model: dict[int, list[ContextOverflow]] = {}
    for o in overflows:
        by_model.setdefault(o.model_index, []).append(o)
    parts = []
    for index, items in sorted(by_model.items()):
        worst = max(items, key=lambda o: (o.total, -o.prompt_id))
        more = f" (and {len(items) - 1} more prompt/length pairs)" if len(items) > 1 else ""
        parts.append(
            f"models[{index}] {worst.model}: prompt {worst.prompt_id} ({worst.prompt_tokens} tokens) + "
            f"max_new_tokens {worst.max_new_tokens} = {worst.total} > its context of {worst.context} tokens{more}"
        )
    return "; ".join(parts)


def refusal(sweep: Sweep, overflows: Sequence[ContextOverflow]) -> ContextError:
    return ContextError(
        f"{sweep.path}: prompts past the model's context: {describe_overflows(overflows)}; "
        f"shorten them, lower max_new_tokens, or {HOW_TO_ALLOW}"
    )


def plan_lines(checks: Sequence[ModelCheck]) -> list[str]:
    """What `rayq plan` says about each model's context (overflows are said by the caller)."""
    lines = []
    for c in checks:
        if c.context is None:
            lines.append(
                f"  context: not checked for {c.model}: its context length is unknown here "
                f"(give models[{c.model_index}].size.context)"
            )
        elif c.unchecked is not None:
            lines.append(f"  context: not checked for {c.model} (context {c.context} tokens): {c.unchecked}")
        elif not c.overflows:
            size = f"{c.longest_prompt} tokens" if c.counted else f"at most {c.longest_prompt} tokens"
            lines.append(
                f"  context: fits (longest prompt {size} + max_new_tokens {c.max_new_tokens} <= {c.context}) "
                f"for {c.model}"
            )
    return lines


def require_fit(sweep: Sweep, allow: bool = False, checks: Sequence[ModelCheck] | None = None) -> list[ContextOverflow]:
    """The sweep's overflows, allowed by `allow` or the sweep's runtime.allow_past_context; else raises ContextError.

    `checks`: the sweep's `check_models`, when the caller has them already (a check may load tokenizers).
    """
    overflows = [o for c in checks for o in c.overflows] if checks is not None else check_context(sweep)
    if overflows and not (allow or sweep.spec.runtime.allow_past_context):
        raise refusal(sweep, overflows)
    return overflows

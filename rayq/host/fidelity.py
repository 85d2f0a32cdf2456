"""How faithful a model in one precision is, measured once per model host on one evaluation text.

Perplexity alone hides much of what quantization does: a model can keep its perplexity while
preferring other tokens than the model it was made from. So a host measures three numbers:

- perplexity with a sliding window of stride 512, the founding paper's measure, computed as in
  Hugging Face's perplexity guide, so that it compares with published numbers;
- against the sweep's baseline precision of the same model: the KL divergence of the next-token
  distributions, and how often both prefer the same next token (top-1 agreement).

The baseline host computes its distributions once and every other host receives them as a
`Reference`. A whole distribution per position would be vocabulary-sized (49,152 floats for the
bundled model: 600 MB over this text), so a Reference keeps only the baseline's top-K tokens
per position (K=64 by default; about 1.5 MB) and KL is taken on distributions coarsened to those
K tokens plus one bucket for the rest; see `measure` for what that bound means.

The default text, `rayq/fidelity.txt`, ships with the package so that no host downloads
anything: public-domain American documents written out in English prose, the US Declaration of
Independence (1776), Lincoln's Gettysburg Address (1863, Bliss copy) and second inaugural address
(1865), and the opening of Madison's Federalist No. 10 (1787). They were reproduced from memory
and lightly normalised (dashes, a few spellings, the salutations dropped, one grievance of the
Declaration left out), so they are close to the originals but not certified copies. The text is
3,232 tokens with the bundled model's tokenizer: six windows of 1024 at stride 512.
"""

from __future__ import annotations

import inspect
import io
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rayq.catalog.fidelity_text import DEFAULT_LABEL, DEFAULT_TEXT, read_text, text_sha  # noqa: F401

if TYPE_CHECKING:
    import torch


_FORMAT = "rayq.host.fidelity.Reference/1"
# Positions turned into float32 log-probabilities at a time: bounds the memory of a window's
# scoring to this many vocabulary-sized rows, whatever the window and the vocabulary.
_ROWS = 256
# Probability given to the "rest" bucket when the top-K hold (up to rounding) all the mass: a
# floor, so that its logarithm stays finite.
_REST_FLOOR = 1e-12


@dataclass(eq=False)  # eq on arrays would raise ("truth value of an array is ambiguous"), not compare
class Reference:
    """A model's next-token distributions on a text, cut to what another host needs to compare with them.

    `text_sha`, `window` and `stride` decide which positions are scored and with what context; a
    reference made with other values would be compared position by position with other
    predictions, so `measure` refuses it.
    """

    text_sha: str
    window: int
    stride: int
    ids: np.ndarray  # int32 [n_positions, K]: the top-K token ids per scored position, most likely first
    logprobs: np.ndarray  # float32 [n_positions, K]
    argmax: np.ndarray  # int32 [n_positions]

    def __post_init__(self) -> None:
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int32)
        self.logprobs = np.ascontiguousarray(self.logprobs, dtype=np.float32)
        self.argmax = np.ascontiguousarray(self.argmax, dtype=np.int32)
        if self.ids.ndim != 2 or self.ids.shape != self.logprobs.shape or self.argmax.shape != self.ids.shape[:1]:
            raise ValueError(
                f"a Reference needs ids and logprobs of one shape [n_positions, K] and argmax [n_positions]; got "
                f"{self.ids.shape}, {self.logprobs.shape} and {self.argmax.shape}"
            )

    @property
    def n_positions(self) -> int:
        return int(self.ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[1])

    def to_bytes(self) -> bytes:
        """An .npz, so the driver can store the reference in the results directory as one opaque file."""
        header = json.dumps(
            {"format": _FORMAT, "text_sha": self.text_sha, "window": self.window, "stride": self.stride}
        ).encode("utf-8")
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            header=np.frombuffer(header, dtype=np.uint8),
            ids=self.ids,
            logprobs=self.logprobs,
            argmax=self.argmax,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Reference:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                header = json.loads(z["header"].tobytes().decode("utf-8"))
                arrays = {name: z[name] for name in ("ids", "logprobs", "argmax")}
        except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as e:
            raise ValueError(f"not a rayq fidelity reference: {e}") from e
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise ValueError(f"not a rayq fidelity reference (format {header.get('format')!r}, expected {_FORMAT!r})")
        return cls(
            text_sha=str(header["text_sha"]), window=int(header["window"]), stride=int(header["stride"]), **arrays
        )

    def check(self, sha: str, window: int, stride: int) -> None:
        """Refuse a reference that scores other positions, before any forward pass is spent on it."""
        if sha != self.text_sha:
            raise ValueError(
                f"the baseline reference was made on another text (sha256 {self.text_sha}, this text {sha}): "
                "every host of a sweep must measure fidelity on the same text"
            )
        if (window, stride) != (self.window, self.stride):
            raise ValueError(
                f"the baseline reference was made with window {self.window} and stride {self.stride}, this model "
                f"would use window {window} and stride {stride} (its context is shorter, or the settings differ): "
                "the positions and their contexts would not correspond"
            )


@dataclass(frozen=True)
class Fidelity:
    tokens: int  # scored positions
    ppl: float
    kl_div: float | None  # None when no reference was given
    top1_agreement: float | None


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The (begin, end, n_scored) windows of Hugging Face's sliding-window perplexity.

    A window holds tokens [begin, end) and scores its last n_scored tokens, [end - n_scored, end),
    each with at least window - stride tokens of context; together the windows score every
    token after the first exactly once. n_scored is HF's `trg_len` = end - prev_end, except that
    the first window scores end - 1 tokens: the first token has no context to be predicted from
    (HF's model shifts it out of the loss, and the guide's current version subtracts it from the
    count it averages with).

    The stride must be smaller than the window: with stride == window, HF's recipe silently
    leaves the first token of every window unscored, and with a larger one it skips tokens.
    """
    if window < 2:
        raise ValueError(f"a fidelity window must hold at least 2 tokens, not {window}")
    if not 1 <= stride < window:
        raise ValueError(f"the fidelity stride must be between 1 and the window - 1 ({window - 1}), not {stride}")
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        n_scored = end - max(prev_end, 1)
        if n_scored > 0:
            out.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):  # multimodal configs keep the language model's settings apart
        config = config.get_text_config()
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def measure(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    window: int = 1024,
    stride: int = 512,
    max_tokens: int | None = None,
    reference: Reference | None = None,
    top_k: int = 64,
    new_cache: Callable[[], Any] | None = None,
) -> tuple[Fidelity, Reference]:
    """Perplexity of `model` on `text`, and its KL divergence and top-1 agreement with `reference`.

    Returns also this model's own Reference (its top_k tokens per position), which is what a
    baseline host hands to the others.

    The text is tokenized once, with the tokenizer's default special tokens: a Llama-style
    tokenizer prepends its BOS, which gives the first window the start the model was trained
    with and is itself never scored; SmolLM2's adds nothing. The window is cut to the model's
    context (config.max_position_embeddings) where that is known; if that leaves the stride no
    smaller than the window, the stride becomes half the window, the ratio of the defaults. A
    reference records the window and stride used, so the baseline and its quantized copies,
    which share the context, agree on them.

    KL is computed on the distributions coarsened to the reference's top-K tokens plus one
    bucket for all the others:

        KL = sum_i p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)

    with p the baseline's probabilities, q this model's at the same token ids, and
    rest = 1 - (sum over the K tokens), floored at 1e-12; averaged over positions. Merging
    outcomes can only lose information, so by the data-processing inequality this is a lower
    bound of the full KL(P || Q); it equals the full KL when the K tokens hold all of P's mass,
    and it misses only what Q does inside the bucket, where P has little mass to weigh it by.

    With `new_cache`, each window's forward gets past_key_values=new_cache(): the host's
    quantized KV cache, through which a KV-cache quantization scheme affects fidelity. The
    window's context (the tokens it does not score) is then fed in a first forward and the
    scored tokens in a second one: caches like transformers' QuantizedCache quantize what a
    forward stores but let that same forward attend to the unquantized states, so in a single
    forward per window the quantization would never be seen. Split this way, scored tokens see
    their context through the cache, as a generating model sees its past; among themselves they
    attend unquantized, as within a cache's residual window. Without a cache the model runs with
    use_cache=False, one forward per window.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    window, stride = _fit_window(context_length(model), window, stride)
    sha = text_sha(text)
    if reference is not None:
        reference.check(sha, window, stride)
    ids = list(tokenizer(text, verbose=False)["input_ids"])[:max_tokens]
    spans = windows(len(ids), window, stride)
    _check_positions(len(ids), sum(n for _, _, n in spans), reference)
    scorer = _Scorer(reference, top_k, _input_device(model))
    _score(model, ids, spans, scorer, new_cache)
    return scorer.result(sha, window, stride)


def _fit_window(limit: int | None, window: int, stride: int) -> tuple[int, int]:
    """The window cut to the model's context; a stride it leaves no smaller than the window halves it."""
    if limit is not None and window > limit:
        window = limit
        if stride >= window:
            stride = max(1, window // 2)
    return window, stride


def _check_positions(n_ids: int, n_positions: int, reference: Reference | None) -> None:
    """A text too short to score, or scored at other positions than the baseline's, is refused."""
    if n_positions == 0:
        raise ValueError(f"the fidelity text is {n_ids} token(s) long: nothing to score")
    if reference is not None and reference.n_positions != n_positions:
        raise ValueError(
            f"the baseline reference scores {reference.n_positions} positions, this model {n_positions}: "
            "the text was tokenized differently (another tokenizer, or another max_tokens)"
        )


def _score(
    model: Any, ids: list[int], spans: list[tuple[int, int, int]], scorer: _Scorer, new_cache: Callable[[], Any] | None
) -> None:
    """Feed every window through the model in inference mode, _ROWS scored positions at a time."""
    import torch

    tokens = torch.tensor(ids, dtype=torch.long, device=scorer.device)
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for begin, end, n in spans:
                logits = _window_logits(model, tokens, begin, end, n, new_cache, keep)
                targets = tokens[end - n : end]
                for r in range(0, n, _ROWS):
                    scorer.add(logits[r : r + _ROWS], targets[r : r + _ROWS])
    finally:
        model.train(was_training)


def _input_device(model: Any) -> torch.device:
    """Where the input ids go: the embeddings' device, which for a model split over GPUs is not every weight's."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _window_logits(
    model: Any,
    tokens: torch.Tensor,
    begin: int,
    end: int,
    n: int,
    new_cache: Callable[[], Any] | None,
    keep: bool,
) -> torch.Tensor:
    """The [n, vocab] logits that predict tokens [end - n, end).

    They come from the n positions before each target, so the window's last token is only ever
    a target and is not fed; asking for the last n logits only (logits_to_keep) spares the
    vocabulary-sized rows of the context.
    """
    inputs = tokens[begin : end - 1].unsqueeze(0)

    def forward(chunk: torch.Tensor, n_logits: int, cache: Any) -> torch.Tensor:
        kwargs: dict[str, Any] = {"use_cache": cache is not None}
        if cache is not None:
            kwargs["past_key_values"] = cache
        if keep:
            kwargs["logits_to_keep"] = n_logits
        return model(input_ids=chunk, **kwargs).logits[0, -n_logits:]

    if new_cache is None:
        return forward(inputs, n, None)
    cache = new_cache()
    split = inputs.shape[1] - n  # the context: tokens the window feeds but does not score
    if split > 0:
        forward(inputs[:, :split], 1, cache)
    return forward(inputs[:, split:], n, cache)


class _Scorer:
    """Sums over scored positions in float64 (NLL, KL, agreement), and keeps this model's own top-K."""

    def __init__(self, reference: Reference | None, top_k: int, device: torch.device) -> None:
        self.reference = reference
        self.top_k = top_k
        self.device = device
        self.pos = 0
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.ids: list[np.ndarray] = []
        self.logprobs: list[np.ndarray] = []

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        import torch

        m = logits.shape[0]
        lq = torch.log_softmax(logits.float(), dim=-1)
        self.nll -= lq.gather(1, targets.unsqueeze(1)).double().sum().item()
        values, idx = lq.topk(min(self.top_k, lq.shape[-1]), dim=-1)
        self.ids.append(idx.to(torch.int32).cpu().numpy())
        self.logprobs.append(values.cpu().numpy())
        ref = self.reference
        if ref is not None:
            rows = slice(self.pos, self.pos + m)
            ref_ids = torch.from_numpy(ref.ids[rows]).to(self.device, torch.long)
            lp = torch.from_numpy(ref.logprobs[rows]).to(self.device, torch.float64)
            lq_at = lq.gather(1, ref_ids).double()
            p = lp.exp()
            # 0 log 0 = 0: a token the baseline rules out (log p = -inf) adds nothing, not nan.
            kl = torch.where(p > 0, p * (lp - lq_at), torch.zeros_like(p)).sum(-1)
            p_rest = (1 - p.sum(-1)).clamp_min(_REST_FLOOR)
            q_rest = (1 - lq_at.exp().sum(-1)).clamp_min(_REST_FLOOR)
            kl += p_rest * (p_rest.log() - q_rest.log())
            self.kl += kl.sum().item()
            ref_argmax = torch.from_numpy(ref.argmax[rows]).to(self.device, torch.long)
            self.agree += int((idx[:, 0] == ref_argmax).sum().item())
        self.pos += m

    def result(self, sha: str, window: int, stride: int) -> tuple[Fidelity, Reference]:
        n = self.pos
        own = Reference(
            text_sha=sha,
            window=window,
            stride=stride,
            ids=np.concatenate(self.ids),
            logprobs=np.concatenate(self.logprobs),
            argmax=np.concatenate([ids[:, 0] for ids in self.ids]),
        )
        compared = self.reference is not None
        fidelity = Fidelity(
            tokens=n,
            ppl=math.exp(min(self.nll / n, 709.0)),  # past e^709 float64 overflows: a broken model's ppl is huge
            kl_div=self.kl / n if compared else None,
            top1_agreement=self.agree / n if compared else None,
        )
        return fidelity, own

"""An engine: what loads one model and decodes, inside a host, behind a narrow protocol.

A model host is two parts put together. The runner (rayq.host.runner.HostRunner), the same
in every host, turns a block of completions into rows: the serial timing sample and the
batched rest, greedy sharing, failed rows, parts as they end, the models row. The engine
only loads and decodes: rayq's own loop over transformers
(rayq.host.transformers_host.TransformersEngine), vLLM (rayq.host.vllm_host.VllmEngine), or a
benchmark's stand-in that sleeps (bench/schedule.py). An engine never builds a row and the
runner never touches a model, so a new engine is one small class, and no host overrides
another's methods (the vLLM host once overrode eight private methods of the transformers host,
and every change to the row loop had to be checked against both).

Torch-free: these values travel between an engine and the runner, and a stand-in engine runs
without torch. The helpers that need torch import it only once an engine has.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Generated:
    """What decoding one completion gave: its text, token counts, timing and peak memory."""

    text: str
    n_prompt_tokens: int
    n_new_tokens: int
    latency_s: float
    ttft_s: float | None
    peak_memory_mb: float


@dataclass(frozen=True)
class Failure:
    """Why a completion has no output: its row's `status` ("oom" or "error") and `error`."""

    status: str
    error: str


@dataclass(frozen=True)
class Decoded:
    """One completion's result from a batched decode, as it ends."""

    index: int  # its position in the list the engine was given
    batch_size: int  # the rows decoding together when it ran: its row's `batch_size` column
    result: Generated | Failure


@dataclass
class Measured:
    """What an engine measures once, after loading and before decoding anything."""

    columns: dict[str, Any] = field(default_factory=dict)  # columns of the models row (held bytes, SQNR, ppl...)
    layers: list[dict[str, Any]] = field(default_factory=list)  # rows of the layers table
    reference: bytes | None = None  # its distributions on the fidelity text (a baseline's, for the others)


class Engine(Protocol):
    """What the runner asks of an engine: load, measure, describe, decode. Nothing about rows."""

    name: str  # the `engine` column of its rows and models row (rayq.catalog.engines)
    settings: dict[str, Any]  # how it loaded, library defaults included: the models row's settings
    context_length: int | None  # the loaded model's context length, else the sweep file's; None: unknown
    # Rows decoding together at most under protocol batched. The runner sets it once the device
    # is known (runtime.batch_size, `auto` resolved); an engine may lower it (out of memory).
    batch_size: int

    def load(self) -> None:
        """Load the model. Raises on failure, leaving nothing loaded: the runner records why
        in the models row and in every row sent to the host, so the sweep goes on."""
        ...

    def measure(self) -> Measured:
        """Measurements taken once after a successful load, before any other forward pass
        (a simulated scheme's noise meters are reset by nothing else)."""
        ...

    def device(self) -> str:
        """Where the model runs, as the `device` column says it; "none" when nothing is loaded."""
        ...

    def sizes(self) -> dict[str, Any]:
        """`n_params` and `footprint_bytes` of the loaded model (None where it cannot tell)."""
        ...

    def weight_columns(self) -> dict[str, Any]:
        """The precision's weight-format columns of the models row."""
        ...

    def decode_serial(self, completion: dict[str, Any]) -> Generated:
        """One completion decoded alone (the paper's protocol, and the serial timing sample).
        Raises on failure: one completion, one row, so the runner turns the exception into it."""
        ...

    def decode_batched(self, completions: list[dict[str, Any]]) -> Iterator[Decoded]:
        """Completions decoded together, each yielded as it ends. A failure is a `Failure`
        result, never an exception: which rows a failed batch takes down is the engine's to
        say (the transformers engine retries smaller on out of memory; vLLM fails the call)."""
        ...


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is torch's out of memory (never true where torch was not imported: a stand-in)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def failure(e: BaseException) -> Failure:
    """A completion's failure from the exception being handled (call it inside the `except`).

    Out of memory frees what it can first, so the next completion starts with the memory back.
    """
    if out_of_memory(e):
        free_memory()
        return Failure("oom", f"OutOfMemoryError: {e}")
    return Failure("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")


def free_memory() -> None:
    """Give back what a failed load or decode left behind, on the GPU too."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_process(threads: int) -> None:
    """What every engine's actor process needs before it loads: quiet libraries, torch's threads."""
    quiet_libraries()
    import torch

    torch.set_num_threads(threads)


def quiet_libraries() -> None:
    """Keep transformers' and bitsandbytes' per-call chatter out of the progress display."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "bitsandbytes", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def precision_weight_columns(precision: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The weight-format columns the precision registry gives for a loaded host (rayq.host.precisions)."""
    from rayq.host import precisions

    try:
        return precisions.weight_columns(precision, settings)
    except Exception:  # noqa: BLE001 - a stand-in precision name (benchmarks) has no scheme to describe
        return {}

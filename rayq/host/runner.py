"""The half of a model host that every engine shares: from a block of completions to rows.

A host (rayq.host.protocol.Host) is this runner put together with an engine
(rayq.host.engine.Engine): the runner loads through the engine, then turns each block it is
sent into result rows, whatever the engine. A completion that fails (an exception, out of
memory) becomes a row with `status` and `error`; a model that fails to load turns every
completion sent to it into such a row, so the sweep goes on and the failure is in the data.

Torch-free: a benchmark's stand-in engine runs the real row loop without torch.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from rayq.host.config import HostConfig
from rayq.host.engine import Engine, Failure, Generated, Measured, failure, free_memory, out_of_memory
from rayq.planning.greedy import greedy_key
from rayq.planning.resources import auto_batch_size


class HostRunner:
    """Loads through `engine`, measures once, then makes rows of every block it is sent."""

    def __init__(self, config: HostConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.node = node_id()
        self.gpu_ids = gpu_ids()
        self.load_error: str | None = None
        self.load_status = "ok"
        self.peak_memory_mb: float | None = None
        self.generated_tokens = 0
        self.generate_s = 0.0
        self.greedy_done: dict[tuple[Any, ...], dict[str, Any]] = {}  # greedy_key -> the row that decoded it
        start = time.perf_counter()
        try:
            engine.load()
        except Exception as e:  # noqa: BLE001 - recorded in every row of this host
            self.load_error = f"load failed: {type(e).__name__}: {e}"
            self.load_status = "oom" if out_of_memory(e) else "error"
            free_memory()  # a half-loaded model must not hold the GPU while this host records its rows
        self.load_s = time.perf_counter() - start
        self.device = engine.device()
        asked = config.batch_size
        engine.batch_size = auto_batch_size(self.device) if asked == "auto" else int(asked)
        self.measured = engine.measure() if self.load_error is None else Measured()

    def reference(self) -> bytes | None:
        """This host's distributions on the fidelity text: the baseline every other host is compared with."""
        return self.measured.reference

    def info(self) -> dict[str, Any]:
        """What this host measured about its model: one row of the `models` table."""
        cfg, engine = self.config, self.engine
        return {
            "model": cfg.model,
            "precision": cfg.precision,
            "node": self.node,
            "device": self.device,
            "torch_threads": cfg.threads,
            "protocol": cfg.protocol,
            "batch_size": engine.batch_size,
            "load_s": self.load_s,
            "load_status": self.load_status,
            "load_error": self.load_error,
            "settings": engine.settings,
            **engine.sizes(),
            "peak_memory_mb": self.peak_memory_mb,
            **self.measured.columns,
            "layers": self.measured.layers,
            "pid": os.getpid(),
            "gpu_ids": ",".join(self.gpu_ids),
            "num_gpus": cfg.num_gpus,
            "estimated_bytes": cfg.estimated_bytes,
            "generated_tokens": self.generated_tokens,
            "generate_s": self.generate_s,
            "context_length": engine.context_length,
            "engine": engine.name,
            **engine.weight_columns(),
        }

    def generate(self, completions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows for `completions` (generate_stream in one part)."""
        return [r for part in self.generate_stream(completions, max(1, len(completions))) for r in part]

    def generate_stream(self, completions: list[dict[str, Any]], every: int) -> Iterator[list[dict[str, Any]]]:
        """Rows for `completions`, in parts of `every` as they end, so a caller commits each part
        while the rest decode: the launcher hands a host a whole block, whose rows then fill the
        batch, and loses no more than a part if the host dies. The time spent and tokens made
        feed the next plan's rates.

        A greedy completion whose output this host already decoded (same prompt, max_new_tokens
        and repetition penalty: the other parameters cannot change a greedy output) is not decoded
        again: its row copies that output and names its source in `shares_output_of`.
        """
        part: list[dict[str, Any]] = []
        last = time.perf_counter()

        def flush(force: bool) -> Iterator[list[dict[str, Any]]]:
            nonlocal part, last
            if len(part) < every and not (force and part):
                return
            now = time.perf_counter()
            if self.load_error is None:
                self.generate_s += now - last
                self.generated_tokens += sum(
                    r["n_new_tokens"] or 0 for r in part if r["status"] == "ok" and r["shares_output_of"] is None
                )
            out, part, last = part, [], now
            yield out

        own, copies = self._split_shared(completions)
        by_id = {c["completion_id"]: c for c in own}
        for row in self._rows(own):
            self._remember(by_id[row["completion_id"]], row)
            part.append(row)
            yield from flush(False)
        retry = []
        for c in copies:
            source = self.greedy_done.get(greedy_key(c))  # type: ignore[arg-type]
            if source is None:  # its source failed: this one is decoded itself
                retry.append(c)
            else:
                part.append(self._shared(c, source))
                yield from flush(False)
        for row in self._rows(retry):
            part.append(row)
            yield from flush(False)
        yield from flush(True)

    def _split_shared(self, completions: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(decoded here, copied from another greedy row's output) for a chunk."""
        if not self.config.share_greedy or self.load_error is not None:
            return completions, []
        own, copies, pending = [], [], set()
        for c in completions:
            key = greedy_key(c)
            if key is not None and (key in self.greedy_done or key in pending):
                copies.append(c)
                continue
            own.append(c)
            if key is not None:
                pending.add(key)
        return own, copies

    def _remember(self, c: dict[str, Any], row: dict[str, Any]) -> None:
        key = greedy_key(c) if self.config.share_greedy else None
        if key is not None and row["status"] == "ok" and key not in self.greedy_done:
            self.greedy_done[key] = row

    def _shared(self, c: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
        """The source row's output and measurements, under this completion's own identity."""
        from rayq.store.dataset import completion_row

        own = completion_row(self.config.sweep, c)
        identity = {k: own[k] for k in ("completion_id", "prompt_id", "prompt", "seed", "sampling_seed", *c["params"])}
        return source | identity | {"shares_output_of": source["completion_id"], "finished_at": datetime.now(UTC)}

    def _rows(self, completions: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """A row per completion, each as soon as it ends: the serial timing sample first, each
        alone, then the rest together (protocol batched)."""
        if self.load_error is not None:
            yield from (self._finish(self._row(c, 1), None) for c in completions)
            return
        for c in completions:
            if row_protocol(c, self.config.protocol) == "serial":
                yield self._serial(c)
        batched = [c for c in completions if row_protocol(c, self.config.protocol) != "serial"]
        if batched:
            for d in self.engine.decode_batched(batched):
                yield self._finish(self._row(batched[d.index], d.batch_size), d.result)

    def _serial(self, c: dict[str, Any]) -> dict[str, Any]:
        row = self._row(c, 1)
        try:
            g = self.engine.decode_serial(c)
        except Exception as e:  # noqa: BLE001 - a failed completion is a row, not a failed sweep
            return self._finish(row, failure(e))
        return self._finish(row, g)

    def _row(self, c: dict[str, Any], batch_size: int) -> dict[str, Any]:
        from rayq.store.dataset import completion_row

        return completion_row(
            self.config.sweep,
            c,
            node=self.node,
            device=self.device,
            batch_size=batch_size,
            protocol=row_protocol(c, self.config.protocol),
            status=self.load_status,
            error=self.load_error,
            kv_cache=self.engine.settings.get("kv_cache", "default") if self.load_error is None else None,
            engine=self.engine.name,
        )

    def _finish(self, row: dict[str, Any], result: Generated | Failure | None) -> dict[str, Any]:
        """Fill a row from what decoding gave: its output, or why there is none (`result` None:
        the host never loaded, and the row already says so)."""
        from rayq.host.metrics import Finished, compute_all

        if isinstance(result, Failure):
            row.update(status=result.status, error=result.error)
        elif result is not None:
            g = result
            used = g.n_prompt_tokens + g.n_new_tokens  # counted as `rayq plan`'s check counts (rayq.planning.context)
            context = self.engine.context_length
            row.update(
                text=g.text,
                n_prompt_tokens=g.n_prompt_tokens,
                n_new_tokens=g.n_new_tokens,
                max_returned_tokens=row["max_new_tokens"] + g.n_prompt_tokens,
                latency_s=g.latency_s,
                ttft_s=g.ttft_s,
                peak_memory_mb=g.peak_memory_mb,
                past_context=None if context is None else used > context,
            )
            row.update(compute_all(Finished(g.text, g.n_prompt_tokens, g.n_new_tokens, g.latency_s, g.ttft_s)))
            self.peak_memory_mb = max(self.peak_memory_mb or 0.0, g.peak_memory_mb)
        row["finished_at"] = datetime.now(UTC)
        return row


def row_protocol(c: dict[str, Any], host_protocol: str) -> str:
    """`serial` for a completion the plan picked for the serial timing sample (runtime.serial_sample)."""
    return c.get("protocol") or host_protocol


def node_id() -> str:
    """The Ray node this host runs on (the `node` column); the machine's name outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray the host name is the node
        pass
    return socket.gethostname()


def gpu_ids() -> list[str]:
    """The GPUs Ray gave this actor (logical ids on a cluster that only pretends to have GPUs)."""
    try:
        import ray

        if ray.is_initialized():
            return [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - outside Ray there is no assignment to report
        pass
    return []


class EngineHost:
    """A model host's Ray actor: the shared row runner over the engine its class names.

    Each engine's actor class (rayq.catalog.engines names them by path) only says which engine
    it runs: `engine_class`. Everything the execution layer calls (rayq.host.protocol.Host) is
    answered here, by the runner, so the engines cannot drift apart in it. `engine` is kept for
    the tests and benchmarks that reach into the loaded model (a forward hook, the tokenizer).
    """

    engine_class: type[Engine]

    def __init__(self, config: HostConfig) -> None:
        self.engine = self.engine_class(config)  # type: ignore[call-arg]
        self.runner = HostRunner(config, self.engine)

    def generate_stream(self, completions: list[dict[str, Any]], every: int) -> Iterator[list[dict[str, Any]]]:
        yield from self.runner.generate_stream(completions, every)

    def generate(self, completions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All rows at once: for tests and benchmarks that hold a host in their own process."""
        return self.runner.generate(completions)

    def info(self) -> dict[str, Any]:
        return self.runner.info()

    def reference(self) -> bytes | None:
        return self.runner.reference()

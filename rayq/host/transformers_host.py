"""The model host: one model in one precision, held on its resources for the whole sweep.

It runs inside a Ray actor (see rayq.execution.driver) and turns a list of planned completions into
result rows. A completion that fails (an exception, out of memory) becomes a row with
`status` and `error`; a model that fails to load turns every completion sent to it into
such a row, so the sweep goes on and the failure is in the data.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Generator, Iterator
from datetime import UTC, datetime
from typing import Any

from rayq.host.config import torch_threads
from rayq.planning.resources import auto_batch_size


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


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray the host name is the node
        pass
    return socket.gethostname()


class ModelHost:
    engine = "transformers"  # rayq.catalog.engines: the `engine` column of its rows

    def __init__(
        self,
        sweep: str,
        model: dict[str, Any],
        precision: str,
        num_cpus: float,
        protocol: str = "serial",
        batch_size: int | str = 1,
        precision_options: dict[str, Any] | None = None,
        layer_sqnr: bool = True,
        placement: dict[str, Any] | None = None,
        fidelity: dict[str, Any] | None = None,
        share_greedy: bool = True,
    ) -> None:
        quiet_libraries()
        import torch

        self.threads = torch_threads(num_cpus)
        torch.set_num_threads(self.threads)
        self.sweep = sweep
        self.model_name = model["name"]
        self.precision = precision
        self.protocol = protocol
        self.node = _node_id()
        self.model: Any = None
        self.tokenizer: Any = None
        self.settings: dict[str, Any] = {}
        self.load_error: str | None = None
        self.load_status = "ok"
        self.peak_memory_mb: float | None = None
        self.measured: dict[str, Any] = {}
        self.layers: list[dict[str, Any]] = []
        self.placement = placement or {}
        self.gpu_ids = _gpu_ids()
        self.generated_tokens = 0
        self.generate_s = 0.0
        self.context_length: int | None = None
        self.fidelity = fidelity  # the sweep's fidelity settings, text and baseline reference (rayq.execution.driver)
        self.own_reference: bytes | None = None  # this host's distributions on the text, when measured
        self.share_greedy = share_greedy
        self.greedy_done: dict[tuple[Any, ...], dict[str, Any]] = {}  # greedy_key -> the row that decoded it
        start = time.perf_counter()
        try:
            path = self._load(model, precision_options or {})
        except Exception as e:  # noqa: BLE001 - recorded in every row of this host
            self.load_error = f"load failed: {type(e).__name__}: {e}"
            self.load_status = "oom" if isinstance(e, torch.OutOfMemoryError) else "error"
            self.model = None
            _free_memory()  # a half-loaded model must not hold the GPU while this host records its rows
        self.load_s = time.perf_counter() - start
        self.device = self._device_name()
        self.batch_size = auto_batch_size(self.device) if batch_size == "auto" else int(batch_size)
        if self.model is not None:
            self._measure(path, layer_sqnr)

    def _measure(self, path: str, with_sqnr: bool) -> None:
        """Memory, per-layer SQNR and a greedy reference, before any other forward pass (see rayq.host.measure)."""
        from rayq.host import measure, precisions

        st = getattr(self.model, "_rayq_sim", None)
        errors = self.settings.pop("layer_errors", {})  # a quantizer's own per-layer loss (GPTQ)
        for key in ("quantize_s", "quantize_peak_mb"):
            self.measured[key] = self.settings.get(key)
        try:
            self.measured["held_bytes"] = measure.held_bytes(self.model)
            if with_sqnr:
                dequantize = precisions.dequantizer(self.precision, self.model)
                self.layers = measure.layer_sqnr(self.model, path, dequantize)
                for row in self.layers:
                    row["quant_error"] = errors.get(row["layer"])
            with _metering(self.model):
                tokens, text = measure.reference_continuation(self.model, self.tokenizer)
            self.measured.update(
                reference_prompt=measure.REFERENCE_PROMPT, reference_tokens=tokens, reference_text=text
            )
        except Exception as e:  # noqa: BLE001 - a measurement that fails must not stop generation
            self.measured["measure_error"] = f"{type(e).__name__}: {e}"
        if self.fidelity is not None:
            self._measure_fidelity(self.fidelity)
        if st is not None:  # the scheme's activation and KV error over the measuring passes above
            self.measured.update(act_sqnr_db=st.acts.db(), kv_sqnr_db=st.kv.db())

    def _measure_fidelity(self, cfg: dict[str, Any]) -> None:
        """Perplexity, and KL and top-1 agreement against the baseline's distributions (rayq.host.fidelity)."""
        from rayq.host import fidelity

        self.measured.update(fidelity_text=cfg["label"], fidelity_baseline=cfg["baseline"])
        try:
            ref = fidelity.Reference.from_bytes(cfg["reference"]) if cfg.get("reference") else None
            st = getattr(self.model, "_rayq_sim", None)
            new_cache = None
            if st is not None and st.scheme.kv is not None:  # fidelity goes through the scheme's KV cache
                from rayq.host.sim_quant import new_cache as make_cache

                new_cache = functools.partial(make_cache, self.model)
            with _metering(self.model):
                got, own = fidelity.measure(
                    self.model,
                    self.tokenizer,
                    cfg["text"],
                    window=cfg["window"],
                    stride=cfg["stride"],
                    max_tokens=cfg.get("max_tokens"),
                    reference=ref,
                    top_k=cfg["top_k"],
                    new_cache=new_cache,
                )
            self.own_reference = own.to_bytes()
            self.measured.update(
                fidelity_tokens=got.tokens, ppl=got.ppl, kl_div=got.kl_div, top1_agreement=got.top1_agreement
            )
            if ref is None and cfg.get("reference_error"):
                self.measured["fidelity_error"] = cfg["reference_error"]
        except Exception as e:  # noqa: BLE001 - like the other measurements: recorded, generation goes on
            self.measured["fidelity_error"] = f"{type(e).__name__}: {e}"

    def reference(self) -> bytes | None:
        """This host's distributions on the fidelity text: the baseline every other host is compared with."""
        return self.own_reference

    def _load(self, model: dict[str, Any], precision_options: dict[str, Any]) -> str:
        from transformers import AutoTokenizer

        from rayq.host import precisions, sources

        path = sources.resolve(model["source"], model.get("revision"))
        device, max_memory = _device_map()
        opts = {
            **precision_options,
            "trust_remote_code": model.get("trust_remote_code", False),
            "revision": model.get("revision"),
            "model_name": model["name"],
            "max_memory": max_memory,
        }
        self.model, self.settings = precisions.load_model(self.precision, path, device, opts)
        self.context_length = _context_length(self.model, model)
        if max_memory:
            self.settings["max_memory"] = {str(k): v for k, v in max_memory.items()}
            spread = getattr(self.model, "hf_device_map", {}) or {}
            self.settings["device_map"] = {str(d): n for d, n in Counter(spread.values()).items()}  # modules per device
        self.tokenizer = AutoTokenizer.from_pretrained(
            path, revision=model.get("revision"), trust_remote_code=model.get("trust_remote_code", False)
        )
        return path

    def _device_name(self) -> str:
        if self.model is None:
            return "none"
        import torch

        dev = self.model.device
        if dev.type == "cuda":
            return f"{dev} ({torch.cuda.get_device_name(dev)})"
        return str(dev)

    def info(self) -> dict[str, Any]:
        """What this host measured about its model: one row of the `models` table."""
        return {
            "model": self.model_name,
            "precision": self.precision,
            "node": self.node,
            "device": self.device,
            "torch_threads": self.threads,
            "protocol": self.protocol,
            "batch_size": self.batch_size,
            "load_s": self.load_s,
            "load_status": self.load_status,
            "load_error": self.load_error,
            "settings": self.settings,
            **self._sizes(),
            "peak_memory_mb": self.peak_memory_mb,
            **self.measured,
            "layers": self.layers,
            "pid": os.getpid(),
            "gpu_ids": ",".join(self.gpu_ids),
            "num_gpus": self.placement.get("num_gpus"),
            "estimated_bytes": self.placement.get("estimated_bytes"),
            "generated_tokens": self.generated_tokens,
            "generate_s": self.generate_s,
            "context_length": self.context_length,
            "engine": self.engine,
            **self._weight_columns(),
        }

    def _sizes(self) -> dict[str, Any]:
        if self.model is None:
            return {"n_params": None, "footprint_bytes": None}
        return {
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "footprint_bytes": int(self.model.get_memory_footprint()),
        }

    def _weight_columns(self) -> dict[str, Any]:
        from rayq.host import precisions

        try:
            return precisions.weight_columns(self.precision, self.settings)
        except Exception:  # noqa: BLE001 - a stand-in precision name (benchmarks) has no scheme to describe
            return {}

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
        if not self.share_greedy or self.load_error is not None:
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
        key = greedy_key(c) if self.share_greedy else None
        if key is not None and row["status"] == "ok" and key not in self.greedy_done:
            self.greedy_done[key] = row

    def _shared(self, c: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
        """The source row's output and measurements, under this completion's own identity."""
        from rayq.store.dataset import completion_row

        own = completion_row(self.sweep, c)
        identity = {k: own[k] for k in ("completion_id", "prompt_id", "prompt", "seed", "sampling_seed", *c["params"])}
        return source | identity | {"shares_output_of": source["completion_id"], "finished_at": datetime.now(UTC)}

    def _rows(self, completions: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """A row per completion, each as soon as it ends."""
        if self.load_error is not None:
            yield from (self._finish(self._row(c, 1), None) for c in completions)
            return
        for c in completions:
            if row_protocol(c, self.protocol) == "serial":
                yield self._serial(c)
        batched = [c for c in completions if row_protocol(c, self.protocol) != "serial"]
        if batched:
            yield from self._batched_rows(batched)

    def _batched_rows(self, batched: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The rows of protocol batched, each as soon as it ends."""
        # Rows of similar length share a batch, so the padding of rows that join it stays short.
        todo = sorted(batched, key=lambda c: c["params"]["max_new_tokens"])
        while todo:
            left: list[dict[str, Any]] = []
            suspects: list[dict[str, Any]] = []
            out_of_memory = yield from self._batched(todo, min(self.batch_size, len(todo)), left, suspects)
            for c in suspects:  # each alone: only a row that fails by itself becomes an error row
                yield from self._batched([c], 1, [], [])
            todo = left
            if out_of_memory:  # halve the batch size (it stays halved) and go on with the rest
                self.batch_size = max(1, self.batch_size // 2)

    def _row(self, c: dict[str, Any], batch_size: int) -> dict[str, Any]:
        from rayq.store.dataset import completion_row

        return completion_row(
            self.sweep,
            c,
            node=self.node,
            device=self.device,
            batch_size=batch_size,
            protocol=row_protocol(c, self.protocol),
            status=self.load_status,
            error=self.load_error,
            kv_cache=self.settings.get("kv_cache", "default") if self.model is not None else None,
            engine=self.engine,
        )

    def _finish(self, row: dict[str, Any], g: Any) -> dict[str, Any]:
        """Fill a row from what decoding measured (`g` None: the row failed before that)."""
        from rayq.host.metrics import Finished, compute_all

        if g is not None:
            used = g.n_prompt_tokens + g.n_new_tokens  # counted as `rayq plan`'s check counts (rayq.planning.context)
            row.update(
                text=g.text,
                n_prompt_tokens=g.n_prompt_tokens,
                n_new_tokens=g.n_new_tokens,
                max_returned_tokens=row["max_new_tokens"] + g.n_prompt_tokens,
                latency_s=g.latency_s,
                ttft_s=g.ttft_s,
                peak_memory_mb=g.peak_memory_mb,
                past_context=None if self.context_length is None else used > self.context_length,
            )
            row.update(compute_all(Finished(g.text, g.n_prompt_tokens, g.n_new_tokens, g.latency_s, g.ttft_s)))
            self.peak_memory_mb = max(self.peak_memory_mb or 0.0, g.peak_memory_mb)
        row["finished_at"] = datetime.now(UTC)
        return row

    def _serial(self, c: dict[str, Any]) -> dict[str, Any]:
        import torch

        from rayq.host.decode import generate_one

        row = self._row(c, 1)
        try:
            g = generate_one(self.model, self.tokenizer, c["prompt"], c["params"], c["sampling_seed"])
        except torch.OutOfMemoryError as e:
            _free_memory()
            return self._finish(row | {"status": "oom", "error": f"OutOfMemoryError: {e}"}, None)
        except Exception as e:  # noqa: BLE001 - a failed completion is a row, not a failed sweep
            return self._finish(row | {"status": "error", "error": _describe(e)}, None)
        return self._finish(row, g)

    def _batched(
        self, todo: list[dict[str, Any]], size: int, left: list[dict[str, Any]], suspects: list[dict[str, Any]]
    ) -> Generator[dict[str, Any], None, bool]:
        """Rows for `todo` as they end, `size` decoding at a time and rows joining as others end.

        When the batch fails, the rows not yet started go to `left`; on out of memory (returns
        True) so do the rows in flight, for a smaller batch. Any other error fails only the row
        that raised it: the rows in flight go to `suspects`, to be run alone, unless it is known.
        """
        import torch

        from rayq.host.batch_decode import Row, iter_batch

        rows = [self._row(c, size) for c in todo]
        ended: set[int] = set()
        started: set[int] = set()
        try:
            for i, g in iter_batch(
                self.model,
                self.tokenizer,
                [Row(c["prompt"], c["params"], c["sampling_seed"]) for c in todo],
                size,
                started,
            ):
                row = self._finish(rows[i], g)
                ended.add(i)
                yield row
            return False
        except torch.OutOfMemoryError as e:
            _free_memory()
            oom = {"status": "oom", "error": f"OutOfMemoryError: {e}"}
            not_ended = [i for i in range(len(todo)) if i not in ended]
            # At batch 1 the row that did not fit is the one in flight; larger batches go on smaller.
            failed = ([i for i in not_ended if i in started] or not_ended)[:1] if size == 1 else []
            yield from (self._finish(rows[i] | oom, None) for i in failed)
            left.extend(todo[i] for i in not_ended if i not in failed)
            return size > 1
        except Exception as e:  # noqa: BLE001 - a failed batch is failed rows, not a failed sweep
            error = {"status": "error", "error": _describe(e)}
            in_flight = [i for i in range(len(todo)) if i in started and i not in ended]
            if not in_flight and not ended:  # it failed before any row ran: all would fail alike
                yield from (self._finish(rows[i] | error, None) for i in range(len(todo)))
                return False
            if len(in_flight) == 1:
                yield self._finish(rows[in_flight[0]] | error, None)
            else:
                suspects.extend(todo[i] for i in in_flight)
            left.extend(todo[i] for i in range(len(todo)) if i not in started)
            return False


def row_protocol(c: dict[str, Any], host_protocol: str) -> str:
    """`serial` for a completion the plan picked for the serial timing sample (runtime.serial_sample)."""
    return c.get("protocol") or host_protocol


def greedy_key(c: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a greedy output depends on within one host; None for a sampled completion (or a row
    of the serial timing sample, which is timed on its own).

    Greedy: temperature 0, do_sample false, or top_k 1 (sampling from one token is its argmax).
    temperature, top_k, top_p, do_sample and the seed then cannot change the output.
    """
    p = c["params"] if "params" in c else c
    if c.get("protocol") == "serial":
        return None
    if bool(p["do_sample"]) and p["temperature"] > 0 and int(p["top_k"]) != 1:
        return None
    return (c["prompt"], int(p["max_new_tokens"]), float(p["repetition_penalty"]))


def _metering(model: Any) -> Any:
    """Meter a scheme's activation and KV noise over the passes inside (rayq.host.sim_quant); a no-op
    for a plain precision, whose host never imports the simulated-quantization code."""
    import contextlib

    if getattr(model, "_rayq_sim", None) is None:
        return contextlib.nullcontext()
    from rayq.host.sim_quant import measuring

    return measuring(model)


def _context_length(model: Any, spec: dict[str, Any]) -> int | None:
    """The loaded model's context length: its config's, else the sweep's `size.context`."""
    from rayq.planning.context import context_from_config

    found = context_from_config(model.config.to_dict())
    return found if found is not None else (spec.get("size") or {}).get("context")


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


def _gpu_ids() -> list[str]:
    """The GPUs Ray gave this actor (logical ids on a cluster that only pretends to have GPUs)."""
    try:
        import ray

        if ray.is_initialized():
            return [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - outside Ray there is no assignment to report
        pass
    return []


def _device_map() -> tuple[str, dict[int, int] | None]:
    """Where to load: the CPU, the one GPU Ray gave this actor, or all of several.

    Ray sets CUDA_VISIBLE_DEVICES to this actor's GPUs, so with more than one the model is
    sharded over exactly those, each allowed its memory less a CUDA context (rayq.planning.estimate).
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    n = torch.cuda.device_count()
    if n == 1:
        return "cuda", None
    from rayq.planning.estimate import CUDA_CONTEXT_BYTES

    total = {i: torch.cuda.get_device_properties(i).total_memory for i in range(n)}
    return "auto", {i: max(0, t - CUDA_CONTEXT_BYTES) for i, t in total.items()}


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

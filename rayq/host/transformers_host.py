"""The transformers engine's host: rayq's own decoding loop over transformers' forward pass.

`ModelHost` is the Ray actor the engine registry names (rayq.catalog.engines): one model in one
precision, held on its resources for the whole sweep. It is the shared row runner
(rayq.host.runner.HostRunner) put together with a `TransformersEngine`, which loads the model in
its precision (rayq.host.precisions), measures it once (memory, per-layer SQNR, a greedy
reference, fidelity), and decodes: one completion at a time (rayq.host.decode, the paper's
protocol) or rows joining a running batch (rayq.host.batch_decode).

Importing this module does not import torch (every torch import is inside a function), so the
driver can name the class where it creates the actor without loading torch itself.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Generator, Iterator
from typing import Any

from rayq.host.config import HostConfig
from rayq.host.engine import Decoded, Generated, Measured, failure, precision_weight_columns, prepare_process
from rayq.host.runner import EngineHost


class TransformersEngine:
    """Every precision, serial or batched (rayq.host.engine.Engine)."""

    name = "transformers"  # rayq.catalog.engines: the `engine` column of its rows

    def __init__(self, config: HostConfig) -> None:
        prepare_process(config.threads)
        self.config = config
        self.model: Any = None
        self.tokenizer: Any = None
        self.settings: dict[str, Any] = {}
        self.context_length: int | None = None
        self.batch_size = 1  # set by the runner once the device is known; halved on out of memory
        self.path: str | None = None  # the weights' local directory, once resolved

    def load(self) -> None:
        from transformers import AutoTokenizer

        from rayq.host import precisions, sources

        cfg = self.config
        try:
            path = sources.resolve(cfg.source, cfg.revision)
            device, max_memory = _device_map()
            opts = {
                **cfg.precision_options,
                "trust_remote_code": cfg.trust_remote_code,
                "revision": cfg.revision,
                "model_name": cfg.model,
                "max_memory": max_memory,
            }
            self.model, self.settings = precisions.load_model(cfg.precision, path, device, opts)
            self.context_length = _context_length(self.model, cfg.context)
            if max_memory:
                self.settings["max_memory"] = {str(k): v for k, v in max_memory.items()}
                spread = getattr(self.model, "hf_device_map", {}) or {}
                self.settings["device_map"] = {str(d): n for d, n in Counter(spread.values()).items()}  # per device
            self.tokenizer = AutoTokenizer.from_pretrained(
                path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
            )
        except BaseException:
            self.model = None  # nothing half-loaded is used (the runner frees its memory)
            raise
        self.path = path

    def measure(self) -> Measured:
        """Memory, per-layer SQNR and a greedy reference, before any other forward pass (see rayq.host.measure)."""
        from rayq.host import measure, precisions

        out = Measured()
        st = getattr(self.model, "_rayq_sim", None)
        errors = self.settings.pop("layer_errors", {})  # a quantizer's own per-layer loss (GPTQ)
        for key in ("quantize_s", "quantize_peak_mb"):
            out.columns[key] = self.settings.get(key)
        try:
            out.columns["held_bytes"] = measure.held_bytes(self.model)
            if self.config.layer_sqnr:
                dequantize = precisions.dequantizer(self.config.precision, self.model)
                out.layers = measure.layer_sqnr(self.model, self.path, dequantize)
                for row in out.layers:
                    row["quant_error"] = errors.get(row["layer"])
            with _metering(self.model):
                tokens, text = measure.reference_continuation(self.model, self.tokenizer)
            out.columns.update(reference_prompt=measure.REFERENCE_PROMPT, reference_tokens=tokens, reference_text=text)
        except Exception as e:  # noqa: BLE001 - a measurement that fails must not stop generation
            out.columns["measure_error"] = f"{type(e).__name__}: {e}"
        if self.config.fidelity is not None:
            out.reference = self._measure_fidelity(self.config.fidelity, out.columns)
        if st is not None:  # the scheme's activation and KV error over the measuring passes above
            out.columns.update(act_sqnr_db=st.acts.db(), kv_sqnr_db=st.kv.db())
        return out

    def _measure_fidelity(self, cfg: Any, columns: dict[str, Any]) -> bytes | None:
        """Perplexity, and KL and top-1 agreement against the baseline's distributions (rayq.host.fidelity);
        returns this host's own distributions on the text, the baseline's reference when it is one."""
        from rayq.host import fidelity

        columns.update(fidelity_text=cfg["label"], fidelity_baseline=cfg["baseline"])
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
            columns.update(
                fidelity_tokens=got.tokens, ppl=got.ppl, kl_div=got.kl_div, top1_agreement=got.top1_agreement
            )
            if ref is None and cfg.get("reference_error"):
                columns["fidelity_error"] = cfg["reference_error"]
            return own.to_bytes()
        except Exception as e:  # noqa: BLE001 - like the other measurements: recorded, generation goes on
            columns["fidelity_error"] = f"{type(e).__name__}: {e}"
            return None

    def device(self) -> str:
        if self.model is None:
            return "none"
        import torch

        dev = self.model.device
        if dev.type == "cuda":
            return f"{dev} ({torch.cuda.get_device_name(dev)})"
        return str(dev)

    def sizes(self) -> dict[str, Any]:
        if self.model is None:
            return {"n_params": None, "footprint_bytes": None}
        return {
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "footprint_bytes": int(self.model.get_memory_footprint()),
        }

    def weight_columns(self) -> dict[str, Any]:
        return precision_weight_columns(self.config.precision, self.settings)

    def decode_serial(self, completion: dict[str, Any]) -> Generated:
        from rayq.host.decode import generate_one

        c = completion
        return generate_one(self.model, self.tokenizer, c["prompt"], c["params"], c["sampling_seed"])

    def decode_batched(self, completions: list[dict[str, Any]]) -> Iterator[Decoded]:
        """Rows join a running batch as others end. Out of memory halves the batch size (it
        stays halved) and the rows not done go on smaller; any other error fails only the row
        that raised it (the rows in flight are decoded again, each alone, to find it)."""
        # Rows of similar length share a batch, so the padding of rows that join it stays short.
        todo = sorted(range(len(completions)), key=lambda i: completions[i]["params"]["max_new_tokens"])
        while todo:
            left: list[int] = []
            suspects: list[int] = []
            out_of_memory = yield from self._pass(completions, todo, min(self.batch_size, len(todo)), left, suspects)
            for i in suspects:  # each alone: only a row that fails by itself becomes an error row
                yield from self._pass(completions, [i], 1, [], [])
            todo = left
            if out_of_memory:
                self.batch_size = max(1, self.batch_size // 2)

    def _pass(
        self, completions: list[dict[str, Any]], todo: list[int], size: int, left: list[int], suspects: list[int]
    ) -> Generator[Decoded, None, bool]:
        """Results for `todo` (indices into `completions`) as they end, `size` decoding at a time.

        When the batch fails, the rows not yet started go to `left`; on out of memory (returns
        True) so do the rows in flight, for a smaller batch. Any other error fails only the row
        that raised it: the rows in flight go to `suspects`, to be run alone, unless it is known.
        """
        from rayq.host.batch_decode import Row, iter_batch

        ended: set[int] = set()
        started: set[int] = set()
        rows = [Row(completions[i]["prompt"], completions[i]["params"], completions[i]["sampling_seed"]) for i in todo]
        try:
            for j, g in iter_batch(self.model, self.tokenizer, rows, size, started):
                ended.add(j)
                yield Decoded(todo[j], size, g)
            return False
        except Exception as e:  # noqa: BLE001 - a failed batch is failed rows, not a failed sweep
            why = failure(e)
        not_ended = [j for j in range(len(todo)) if j not in ended]
        if why.status == "oom":
            # At batch 1 the row that did not fit is the one in flight; larger batches go on smaller.
            failed = ([j for j in not_ended if j in started] or not_ended)[:1] if size == 1 else []
            yield from (Decoded(todo[j], size, why) for j in failed)
            left.extend(todo[j] for j in not_ended if j not in failed)
            return size > 1
        in_flight = [j for j in not_ended if j in started]
        if not in_flight and not ended:  # it failed before any row ran: all would fail alike
            yield from (Decoded(i, size, why) for i in todo)
            return False
        if len(in_flight) == 1:
            yield Decoded(todo[in_flight[0]], size, why)
        else:
            suspects.extend(todo[j] for j in in_flight)
        left.extend(todo[j] for j in range(len(todo)) if j not in started)
        return False


class ModelHost(EngineHost):
    """The transformers engine's Ray actor (rayq.host.protocol.Host): the row runner over a `TransformersEngine`."""

    engine_class = TransformersEngine


def _metering(model: Any) -> Any:
    """Meter a scheme's activation and KV noise over the passes inside (rayq.host.sim_quant); a no-op
    for a plain precision, whose host never imports the simulated-quantization code."""
    import contextlib

    if getattr(model, "_rayq_sim", None) is None:
        return contextlib.nullcontext()
    from rayq.host.sim_quant import measuring

    return measuring(model)


def _context_length(model: Any, sweep_context: int | None) -> int | None:
    """The loaded model's context length: its config's, else the sweep's `size.context`."""
    from rayq.planning.context import context_from_config

    found = context_from_config(model.config.to_dict())
    return found if found is not None else sweep_context


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

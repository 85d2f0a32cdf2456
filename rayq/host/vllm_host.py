"""The vLLM model host: one `vllm.LLM` in a Ray actor, with the transformers host's interface and rows.

It differs from rayq.host.transformers_host.ModelHost only in how it loads and decodes. A block's batched
completions go to vLLM as one `generate` call (protocol batched: vLLM's continuous batching
and paged KV cache schedule them) or one request at a time (protocol serial), each with its own
SamplingParams and the seed derived from its completion id. Prompts are tokenized by the
model's own tokenizer and sent as token ids, and texts are decoded by it, so a row means the
same thing under both engines.

The engine runs inside the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): no engine
process outlives a killed actor, the `__main__` guard vLLM's spawned engine needs does not
apply, and on a GPU the actor's own torch sees the memory vLLM uses. A host holding several
GPUs (Ray gave it all of them, one placement-group bundle on one node) runs vLLM's tensor
parallelism over them with vLLM's multiprocessing executor, as Ray Data LLM does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from rayq.catalog.vllm_support import BNB_IN_FLIGHT, CPU_KV_CACHE_GIB, DTYPES
from rayq.host.decode import Generated
from rayq.host.transformers_host import ModelHost, _describe, _free_memory

# The share of a whole GPU vLLM may fill (weights, activations, KV cache); scaled down for a shared GPU.
GPU_MEMORY_UTILIZATION = 0.9


def engine_settings(precision: str, num_gpus: float, on_gpu: bool, batch_size: int | None) -> dict[str, Any]:
    """The `LLM(...)` arguments for a host, all of them recorded in the models table's settings."""
    kw: dict[str, Any] = {"seed": 0, "disable_log_stats": False}  # stats on: per-request TTFT and latency
    if precision in DTYPES:
        kw["dtype"] = DTYPES[precision]
    elif precision == "gptq-int4":  # the checkpoint says quant_method gptq; activations must be 16-bit
        kw.update(dtype="float16" if on_gpu else "bfloat16", quantization="gptq")
    elif precision in BNB_IN_FLIGHT:
        kw.update(dtype="bfloat16", quantization="bitsandbytes")  # the vllm-bnb-plugin's in-flight NF4
    else:  # rayq.catalog.vllm_support refused it before launch; a host started anyway says why
        raise ValueError(f"the vLLM engine does not run precision {precision!r}")
    if batch_size is not None:
        kw["max_num_seqs"] = batch_size
    if on_gpu:
        share = num_gpus if 0 < num_gpus < 1 else 1.0
        kw["gpu_memory_utilization"] = round(GPU_MEMORY_UTILIZATION * share, 3)
        if num_gpus > 1:
            kw.update(tensor_parallel_size=int(num_gpus), distributed_executor_backend="mp")
    else:
        kw["enforce_eager"] = True  # no graph capture on the CPU backend
    return kw


def sampling_params(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """A row's decoding parameters as vLLM's SamplingParams fields (greedy: temperature 0)."""
    sample = bool(params["do_sample"]) and params["temperature"] > 0
    top_k = int(params["top_k"])
    return {
        "temperature": float(params["temperature"]) if sample else 0.0,
        "top_k": top_k if sample and top_k > 0 else -1,
        "top_p": float(params["top_p"]) if sample else 1.0,
        "repetition_penalty": float(params["repetition_penalty"]),
        "max_tokens": int(params["max_new_tokens"]),
        "seed": int(seed),
        "skip_special_tokens": True,
    }


class VllmHost(ModelHost):
    engine = "vllm"

    def _load(self, model: dict[str, Any], precision_options: dict[str, Any]) -> str:
        from transformers import AutoConfig, AutoTokenizer

        from rayq.host import sources
        from rayq.planning.context import context_from_config

        path = sources.resolve(model["source"], model.get("revision"))
        remote = model.get("trust_remote_code", False)
        num_gpus = float(self.placement.get("num_gpus") or 0)
        on_gpu = bool(self.gpu_ids) or num_gpus > 0
        batch = None if self.batch_size_asked == "auto" else int(self.batch_size_asked)
        kw = engine_settings(self.precision, num_gpus, on_gpu, batch)
        quantized: dict[str, Any] = {}
        revision = model.get("revision")
        if kw.get("quantization") == "gptq":  # rayq's GPTQModel checkpoint (quantized once, cached)
            from rayq.catalog import precisions
            from rayq.host.precisions import gptq

            opts = {**precisions.get(self.precision).defaults, **precision_options, "model_name": model["name"],
                    "revision": model.get("revision"), "trust_remote_code": remote}  # fmt: skip
            target, quantized = gptq.checkpoint(path, "cuda" if on_gpu else "cpu", opts)
            path, revision = str(target), None  # a local directory, with the tokenizer saved beside
            # The CPU kernel would quantize bf16 activations to int8 on AMX CPUs (W4A8); GPTQ is W4A16.
            os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # OMP_NUM_THREADS (the host's CPUs) rules
        import vllm

        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=remote)
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=remote)
        found = context_from_config(config.to_dict())
        self.context_length = found if found is not None else (model.get("size") or {}).get("context")
        self.model = vllm.LLM(
            model=path, tokenizer=path, revision=revision, trust_remote_code=remote, **kw
        )
        self.settings = {
            **quantized,
            **kw,
            "engine": "vllm",
            "vllm_version": vllm.__version__,
            "multiprocessing": False,
            **({} if on_gpu else {"cpu_kv_cache_gib": int(os.environ["VLLM_CPU_KVCACHE_SPACE"])}),
        }
        return path

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # ModelHost's constructor loads (self._load) before it reads batch_size; the vLLM engine
        # needs it at load time (max_num_seqs), so it is kept from the arguments first.
        names = ("sweep", "model", "precision", "num_cpus", "protocol", "batch_size")
        bound = dict(zip(names, args, strict=False)) | kwargs
        self.batch_size_asked = bound.get("batch_size", 1) if bound.get("protocol", "serial") != "serial" else 1
        super().__init__(*args, **kwargs)

    def _measure(self, path: str, with_sqnr: bool) -> None:
        """vLLM's own kernels hold the weights: no per-layer SQNR or transformers reference here."""
        self.measured["measure_error"] = None

    def _device_name(self) -> str:
        if self.model is None:
            return "none"
        import torch

        if self.gpu_ids and torch.cuda.is_available():
            return f"cuda ({torch.cuda.get_device_name(0)})"
        return "cpu"

    def _sizes(self) -> dict[str, Any]:
        return {"n_params": None, "footprint_bytes": None}

    def _weight_columns(self) -> dict[str, Any]:
        cols = super()._weight_columns()
        if self.precision in BNB_IN_FLIGHT:
            cols["weight_format"] = "vllm bitsandbytes nf4 (in-flight, double quant)"
        return cols

    def _serial(self, c: dict[str, Any]) -> dict[str, Any]:
        return self._requests([c])[0]

    def _batched_rows(self, batched: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """One `generate` call, which vLLM schedules by continuous batching (so its rows come
        back together)."""
        yield from self._requests(batched)

    def _requests(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows for `chunk`, sent to vLLM as one `generate` call."""
        import torch
        from vllm import SamplingParams

        from rayq.host.decode import peak_memory_mb

        limit = self.settings.get("max_num_seqs")
        together = min(len(chunk), limit) if limit else len(chunk)
        rows = [self._row(c, together) for c in chunk]
        device = torch.device("cuda" if self.device.startswith("cuda") else "cpu")
        try:
            prompts = [{"prompt_token_ids": self.tokenizer(c["prompt"])["input_ids"]} for c in chunk]
            sps = [SamplingParams(**sampling_params(c["params"], c["sampling_seed"])) for c in chunk]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            outs = self.model.generate(prompts, sps, use_tqdm=False)
            wall = time.perf_counter() - start
        except torch.OutOfMemoryError as e:
            _free_memory()
            return [self._finish(r | {"status": "oom", "error": f"OutOfMemoryError: {e}"}, None) for r in rows]
        except Exception as e:  # noqa: BLE001 - a failed call is failed rows, not a failed sweep
            return [self._finish(r | {"status": "error", "error": _describe(e)}, None) for r in rows]
        peak = peak_memory_mb(device)
        return [self._finish(r, _generated(o, self.tokenizer, wall, peak)) for r, o in zip(rows, outs, strict=True)]


def _generated(out: Any, tokenizer: Any, wall: float, peak: float) -> Generated:
    """One request's result in the transformers host's terms.

    Latency runs from the request's arrival to its last token (first_token_latency is measured
    from arrival; the token stamps share the engine's monotonic clock); without vLLM's
    per-request stats, the whole call's wall time stands for both.
    """
    ids = list(out.outputs[0].token_ids)
    m = getattr(out, "metrics", None)
    ttft = getattr(m, "first_token_latency", None) if m is not None else None
    if ttft is not None and m.first_token_ts and m.last_token_ts:
        latency = ttft + (m.last_token_ts - m.first_token_ts)
    else:
        latency, ttft = wall, None
    return Generated(
        text=tokenizer.decode(ids, skip_special_tokens=True),
        n_prompt_tokens=len(out.prompt_token_ids),
        n_new_tokens=len(ids),
        latency_s=latency,
        ttft_s=ttft,
        peak_memory_mb=peak,
    )

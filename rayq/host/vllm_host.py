"""The vLLM model host: one `vllm.LLM` in a Ray actor, with the transformers host's interface and rows.

`VllmHost` is the shared row runner (rayq.host.runner.HostRunner) put together with a
`VllmEngine`, exactly as the transformers host is with its own engine: the two differ only in
the engine, which loads and decodes (rayq.host.engine.Engine). A block's batched
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

from rayq.catalog import precisions
from rayq.catalog.vllm_support import BNB_IN_FLIGHT, CPU_KV_CACHE_GIB, DTYPES
from rayq.host.config import HostConfig
from rayq.host.engine import Decoded, Generated, Measured, failure, precision_weight_columns, prepare_process
from rayq.host.runner import EngineHost, gpu_ids
from rayq.planning.greedy import samples

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
    sample = samples(params)
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


class VllmEngine:
    """vLLM's engine (rayq.host.engine.Engine): continuous batching, a paged KV cache."""

    name = "vllm"

    def __init__(self, config: HostConfig) -> None:
        prepare_process(config.threads)
        self.config = config
        self.model: Any = None  # the vllm.LLM
        self.tokenizer: Any = None
        self.settings: dict[str, Any] = {}
        self.context_length: int | None = None
        self.batch_size = 1  # set by the runner once the device is known
        self.gpu_ids = gpu_ids()
        # vLLM needs the batch size at load time (max_num_seqs): the one asked for, not auto's pick.
        self.batch_size_asked = config.batch_size if config.protocol != "serial" else 1

    def load(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from rayq.host import sources
        from rayq.planning.context import context_from_config

        cfg = self.config
        path = sources.resolve(cfg.source, cfg.revision)
        remote = cfg.trust_remote_code
        num_gpus = float(cfg.num_gpus or 0)
        on_gpu = bool(self.gpu_ids) or num_gpus > 0
        batch = None if self.batch_size_asked == "auto" else int(self.batch_size_asked)
        kw = engine_settings(cfg.precision, num_gpus, on_gpu, batch)
        quantized: dict[str, Any] = {}
        revision = cfg.revision
        if kw.get("quantization") == "gptq":  # rayq's GPTQModel checkpoint (quantized once, cached)
            from rayq.host.precisions import gptq

            opts = {**precisions.get(cfg.precision).defaults, **cfg.precision_options, "model_name": cfg.model,
                    "revision": cfg.revision, "trust_remote_code": remote}  # fmt: skip
            target, quantized = gptq.checkpoint(path, "cuda" if on_gpu else "cpu", opts)
            path, revision = str(target), None  # a local directory, with the tokenizer saved beside
            # The CPU kernel would quantize bf16 activations to int8 on AMX CPUs (W4A8); GPTQ is W4A16.
            os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
        _engine_environment(on_gpu)
        import vllm

        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=remote)
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=remote)
        found = context_from_config(config.to_dict())
        self.context_length = found if found is not None else cfg.context
        self.model = vllm.LLM(model=path, tokenizer=path, revision=revision, trust_remote_code=remote, **kw)
        self.settings = {
            **quantized,
            **kw,
            "engine": "vllm",
            "vllm_version": vllm.__version__,
            "multiprocessing": False,
            **({} if on_gpu else {"cpu_kv_cache_gib": int(os.environ["VLLM_CPU_KVCACHE_SPACE"])}),
        }

    def measure(self) -> Measured:
        """vLLM's own kernels hold the weights: no per-layer SQNR or transformers reference here."""
        return Measured(columns={"measure_error": None})

    def device(self) -> str:
        if self.model is None:
            return "none"
        import torch

        if self.gpu_ids and torch.cuda.is_available():
            return f"cuda ({torch.cuda.get_device_name(0)})"
        return "cpu"

    def sizes(self) -> dict[str, Any]:
        return {"n_params": None, "footprint_bytes": None}

    def weight_columns(self) -> dict[str, Any]:
        cols = precision_weight_columns(self.config.precision, self.settings)
        if self.config.precision in BNB_IN_FLIGHT:
            cols["weight_format"] = "vllm bitsandbytes nf4 (in-flight, double quant)"
        return cols

    def decode_serial(self, completion: dict[str, Any]) -> Generated:
        outs, wall, peak = self._generate([completion])
        return _generated(outs[0], self.tokenizer, wall, peak)

    def decode_batched(self, completions: list[dict[str, Any]]) -> Iterator[Decoded]:
        """One `generate` call, which vLLM schedules by continuous batching (so its rows come
        back together); a failed call fails every row of it."""
        limit = self.settings.get("max_num_seqs")
        together = min(len(completions), limit) if limit else len(completions)
        try:
            outs, wall, peak = self._generate(completions)
        except Exception as e:  # noqa: BLE001 - a failed call is failed rows, not a failed sweep
            why = failure(e)
            yield from (Decoded(i, together, why) for i in range(len(completions)))
            return
        for i, o in enumerate(outs):
            yield Decoded(i, together, _generated(o, self.tokenizer, wall, peak))

    def _generate(self, chunk: list[dict[str, Any]]) -> tuple[list[Any], float, float]:
        """vLLM's outputs for `chunk`, sent as one `generate` call; its wall time and peak memory."""
        import torch
        from vllm import SamplingParams

        from rayq.host.decode import peak_memory_mb

        device = torch.device("cuda" if self.device().startswith("cuda") else "cpu")
        prompts = [{"prompt_token_ids": self.tokenizer(c["prompt"])["input_ids"]} for c in chunk]
        sps = [SamplingParams(**sampling_params(c["params"], c["sampling_seed"])) for c in chunk]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        outs = self.model.generate(prompts, sps, use_tqdm=False)
        wall = time.perf_counter() - start
        return outs, wall, peak_memory_mb(device)


class VllmHost(EngineHost):
    """The vLLM engine's Ray actor (rayq.host.protocol.Host): the shared row runner over a `VllmEngine`."""

    engine_class = VllmEngine


def _engine_environment(on_gpu: bool) -> None:
    """vLLM's engine in this process (see the module's docstring), quiet, and on a CPU within the host's share."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # OMP_NUM_THREADS (the host's CPUs) rules


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

"""How fast each host will decode, and so how long it will hold its GPUs, before anything runs.

The scheduler orders hosts by predicted duration and `rayq plan` prices a sweep in
GPU-hours; both need a rate in generated tokens per second for every (model, precision,
protocol, GPU type). A rate comes from the first of three sources that has one:

1. **measured**: what earlier runs of the same model, precision and protocol on the same
   GPU type generated per second of `generate` (the `models` table's `generated_tokens`
   and `generate_s`);
2. **the paper**: Roy 2023's Table 7 (one A100 80GB, serial protocol), where the model
   (by name or hub id) and precision match; carried to another GPU type or to batched
   decoding by the step model below, keeping the paper's own per-step overhead;
3. **an estimate**: a decoding step reads every weight byte once, so its time is a fixed
   overhead per layer (Python, kernel launches, dequantization: `PrecisionInfo.step_ms_per_layer`,
   calibrated on Table 7) plus the larger of the weight bytes over the GPU's memory
   bandwidth and the step's FLOPs over its compute.

The numbers are predictions for ordering and pricing, never measurements: `rayq plan`
prints each rate's source beside it. Imports neither torch nor ray.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from typing import Any

from rayq.catalog.precisions import get
from rayq.errors import RayqError
from rayq.planning.estimate import ModelShape, estimate

# The fraction of the datasheet's memory bandwidth and of its dense bf16 compute that a
# decoding step reaches. 0.7 of the bandwidth fits Table 7's bf16 rows (3B to 40B) within
# 25% with the per-layer overheads of the precision registry; compute rarely binds at the
# batch sizes rayq uses.
BANDWIDTH_EFFICIENCY = 0.7
COMPUTE_EFFICIENCY = 0.5
# Loading: reading the weights from local disk or a warm cache, plus start-up.
LOAD_BYTES_PER_S = 1.0e9
LOAD_FIXED_S = 20.0
DEFAULT_LAYERS = 32  # when a model's shape leaves the layer count out
# A model of unknown size (no `size:` hint, no local config): a 7B model in bf16 on an A100
# decodes about this fast (Table 7), so such a host is neither first nor last in line.
UNKNOWN_RATE = 30.0


@dataclass(frozen=True)
class GpuType:
    name: str
    bandwidth: float  # bytes/s, datasheet
    flops: float  # dense bf16 (fp16 where no bf16) FLOP/s, datasheet
    memory_gib: int
    aliases: tuple[str, ...] = ()  # substrings of the name nvidia-smi / torch report


GPU_TYPES: dict[str, GpuType] = {
    g.name: g
    for g in (
        GpuType("a100-40gb", 1.555e12, 312e12, 40, ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB")),
        GpuType("a100-80gb", 2.039e12, 312e12, 80, ("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB")),
        GpuType("h100-pcie", 2.0e12, 756e12, 80, ("H100 PCIe",)),
        GpuType("h100-80gb", 3.35e12, 989e12, 80, ("H100 80GB HBM3", "H100 SXM", "H100")),
        GpuType("h200", 4.8e12, 989e12, 141, ("H200",)),
        GpuType("b200", 8.0e12, 2250e12, 180, ("B200",)),
        GpuType("l40s", 0.864e12, 362e12, 48, ("L40S",)),
        GpuType("l4", 0.3e12, 121e12, 24, ("L4",)),
        GpuType("a10g", 0.6e12, 70e12, 24, ("A10G",)),
        GpuType("rtx4090", 1.008e12, 165e12, 24, ("4090",)),
        GpuType("v100-32gb", 0.9e12, 125e12, 32, ("V100",)),
        GpuType("t4", 0.32e12, 65e12, 16, ("T4",)),
        # A host on CPUs (no GPU): a server socket's order of magnitude; measured rates win.
        GpuType("cpu", 0.02e12, 1e12, 0, ("cpu",)),
    )
}
PAPER_GPU = "a100-80gb"  # Table 7 was measured on one A100 80GB
DEFAULT_GPU = PAPER_GPU


class UnknownGpuTypeError(RayqError, ValueError):
    """A GPU type name not in GPU_TYPES; the message names the known ones."""


def gpu_type(name: str) -> GpuType:
    try:
        return GPU_TYPES[name]
    except KeyError:
        raise UnknownGpuTypeError(f"unknown GPU type {name!r}; known: {', '.join(GPU_TYPES)}") from None


def gpu_type_of_device(device: str | None) -> str | None:
    """The GPU type of a `device` column value ('cuda:0 (NVIDIA A100-SXM4-80GB)', 'cpu'), if known."""
    if not device or device == "none":
        return None
    if device.startswith("cpu"):
        return "cpu"
    for g in GPU_TYPES.values():  # the order above puts longer, more specific names first
        if any(a.lower() in device.lower() for a in g.aliases):
            return g.name
    return None


@dataclass(frozen=True)
class Rate:
    tokens_per_s: float
    source: str  # "measured", "paper", "estimate"
    note: str = ""


def _step_s(shape: ModelShape, precision: str, gpu: GpuType, batch: int) -> float:

    info = get(precision)
    weights = estimate(shape, precision, 1, 1).weights
    memory_s = weights / (gpu.bandwidth * BANDWIDTH_EFFICIENCY)
    compute_s = 2.0 * shape.params * batch / (gpu.flops * COMPUTE_EFFICIENCY)
    return info.step_ms_per_layer * (shape.layers or DEFAULT_LAYERS) / 1000 + max(memory_s, compute_s)


def _hardware_s(shape: ModelShape, precision: str, gpu: GpuType, batch: int) -> float:
    """The part of a step that depends on the GPU (bytes and FLOPs), without the fixed overhead."""

    overhead = get(precision).step_ms_per_layer * (shape.layers or DEFAULT_LAYERS) / 1000
    return _step_s(shape, precision, gpu, batch) - overhead


@dataclass(frozen=True)
class PaperRate:
    model: str
    precision: str
    min_tok_s: float
    max_tok_s: float


# Table 7's names, mapped to rayq's precision names and to the hub ids of roy2023.yaml.
_PAPER_PRECISIONS = {
    "bnb.nf4": "bnb-nf4",
    "bnb.nf4-dq": "bnb-nf4-dq",
    "bnb.fp4": "bnb-fp4",
    "bnb.fp4-dq": "bnb-fp4-dq",
    "bnb.int8": "bnb-int8",
    "bfloat16": "bf16",
}
_PAPER_HUB_IDS = {
    "stablelm-3b": "stabilityai/stablelm-base-alpha-3b",
    "redpajama-3b": "togethercomputer/RedPajama-INCITE-Base-3B-v1",
    "falcon-7b": "tiiuae/falcon-7b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "falcon-40b": "tiiuae/falcon-40b",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
}


def paper_rates() -> dict[tuple[str, str], PaperRate]:
    """Table 7 by (paper model name, rayq precision)."""
    text = resources.files("rayq.catalog").joinpath("roy2023/tokens_per_sec.csv").read_text()
    out = {}
    for row in csv.DictReader(text.splitlines()):
        p = _PAPER_PRECISIONS[row["quant"]]
        out[(row["model"], p)] = PaperRate(row["model"], p, float(row["min_tok_s"]), float(row["max_tok_s"]))
    return out


def _paper_model(model: Any) -> str | None:
    """The Table 7 model a sweep's model is: the same hub id, or the same name with no other source."""
    hub = getattr(model, "hub", None)
    for name, hub_id in _PAPER_HUB_IDS.items():
        if hub is not None and hub.lower() == hub_id.lower():
            return name
    if hub is None and getattr(model, "path", None) is None and model.name in _PAPER_HUB_IDS:
        return model.name
    return None


MeasuredKey = tuple[str, str, str, str]  # model name, precision, protocol, GPU type


def rate(
    model: Any,
    shape: ModelShape | None,
    precision: str,
    protocol: str,
    batch: int,
    gpu: str,
    measured: dict[MeasuredKey, float] | None = None,
) -> Rate:
    """Generated tokens per second of one host, from the best source that knows it."""
    if measured:
        got = measured.get((model.name, precision, protocol, gpu))
        if got:
            return Rate(got, "measured", f"earlier runs on {gpu}")
    g = gpu_type(gpu)
    b = 1 if protocol == "serial" else max(1, batch)
    paper = paper_rates().get((_paper_model(model) or "", precision))
    if paper is not None:
        r = (paper.min_tok_s + paper.max_tok_s) / 2
        if shape is None or (gpu == PAPER_GPU and b == 1):
            return Rate(r, "paper", "Table 7, A100 80GB, serial: mean of min and max")
        # Keep the paper's overhead (its step time less the A100's hardware part), swap the hardware.
        overhead = max(0.0, 1 / r - _hardware_s(shape, precision, gpu_type(PAPER_GPU), 1))
        step = overhead + _hardware_s(shape, precision, g, b)
        return Rate(b / step, "paper", f"Table 7 carried to {gpu}" + (f", batch {b}" if b > 1 else ""))
    if shape is None:
        return Rate(UNKNOWN_RATE, "default", "model size unknown: give models[].size")
    return Rate(b / _step_s(shape, precision, g, b), "estimate", f"weights over {gpu} bandwidth")


def load_s(shape: ModelShape | None, precision: str) -> float:
    if shape is None:
        return LOAD_FIXED_S
    return LOAD_FIXED_S + estimate(shape, precision, 1, 1).weights / LOAD_BYTES_PER_S

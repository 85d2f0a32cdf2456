"""What the vLLM engine serves, per precision and device, and why not where it does not.

Torch-free and vllm-free: `rayq plan` consults it before anything starts. The rules follow
vLLM 0.32/0.33 (shared/reference/vllm.md; docs/engines.md holds the matrix and what was
verified where). A refusal is a sentence a user can act on.
"""

from __future__ import annotations

from rayq.catalog import precisions

# The CPU backend's KV cache, GiB (VLLM_CPU_KVCACHE_SPACE), reserved when the engine starts;
# unset, vLLM takes 92% of the node's RAM. Placement adds it to a CPU host's memory request.
CPU_KV_CACHE_GIB = 1

# rayq's dense precisions and the dtype vLLM is given for each.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# bitsandbytes precisions vLLM can run, with the vllm-bnb-plugin, on NVIDIA GPUs: its in-flight
# quantization is NF4 with double quantization, hard-coded (compress_statistics=True).
BNB_IN_FLIGHT = {"bnb-nf4-dq"}

_BNB_WHY = {
    "bnb-nf4": "vLLM's in-flight bitsandbytes quantization always double-quantizes: use bnb-nf4-dq",
    "bnb-fp4": "vLLM quantizes bitsandbytes in flight to NF4 only; FP4 loads only from a pre-quantized checkpoint",
    "bnb-fp4-dq": "vLLM quantizes bitsandbytes in flight to NF4 only; FP4 loads only from a pre-quantized checkpoint",
    "bnb-int8": "vLLM runs LLM.int8 only from pre-quantized checkpoints; it has no in-flight 8-bit quantization",
}


def refusal(precision: str, device: str) -> str | None:
    info = precisions.get(precision)
    if info.scheme is not None:
        return (
            "quantization schemes (sim-*, -a, -kv, -qkv) hook transformers' modules and cache; "
            "vLLM runs its own kernels: use engine transformers"
        )
    if info.name in DTYPES:
        return None
    if info.family == "bnb":
        if info.name not in BNB_IN_FLIGHT:
            return _BNB_WHY.get(info.name, "vLLM serves bitsandbytes only as in-flight NF4 (bnb-nf4-dq)")
        if device != "cuda":
            return "vLLM runs bitsandbytes on NVIDIA GPUs only (the vllm-bnb-plugin), not on a CPU"
        return None
    if info.family == "gptq":
        return None  # rayq's GPTQModel checkpoint, 4-bit; option_refusal checks its settings
    return f"the vLLM engine has no rule for precision family {info.family!r}"


# vLLM's GPTQ kernels (Marlin on CUDA, CPUWNA16 on x86 CPUs) take symmetric 4-bit weights in
# groups of these sizes (-1: one group per row); act-order (desc_act) is supported.
GPTQ_GROUP_SIZES = (-1, 32, 64, 128)


def option_refusal(precision: str, options: dict[str, object]) -> str | None:
    """Why vLLM cannot run `precision` with these `precision_options`; None when it can."""
    if precisions.get(precision).family != "gptq":
        return None
    if options.get("sym") is False:
        return "vLLM's GPTQ kernels take symmetric weights only (sym: true)"
    group = options.get("group_size", "auto")
    if group != "auto" and group not in GPTQ_GROUP_SIZES:
        return f"vLLM's GPTQ kernels take group_size {', '.join(map(str, GPTQ_GROUP_SIZES))} (got {group})"
    return None

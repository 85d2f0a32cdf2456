"""GPTQ's group size, decided before anything loads: which sizes divide a model's layers.

The pure half of the gptq family (rayq.host.precisions.gptq quantizes and loads): `rayq plan`
and the one preflight refuse an explicit group size a model's layers do not divide, and the host
chooses "auto"'s size with the same functions, from the same config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rayq.catalog.precisions import REGISTRY, get
from rayq.planning.spec import SpecError

if TYPE_CHECKING:
    from rayq.planning.spec import Sweep

# The sizes "auto" chooses from, largest first: GPTQ's usual 128, then the smaller sizes the CPU
# kernel (torch's int4pack matmul) takes. 256 is left out: a coarser group than the usual one
# should be asked for, not chosen.
AUTO_GROUP_SIZES = (128, 64, 32)
CPU_GROUP_SIZES = (32, 64, 128, 256)  # what torch's _weight_int4pack_mm_cpu accepts


class GroupSizeError(SpecError):
    """A group size that does not divide the input size of a layer GPTQ would quantize."""


def layer_inputs(config: Mapping[str, Any]) -> dict[str, int]:
    """The input sizes of the linear layers GPTQ quantizes, by the config key that sets each.

    q/k/v, gate and up take hidden_size, down takes intermediate_size, o takes the heads'
    width (num_attention_heads x head_dim). Empty when the config has no hidden_size (another
    naming scheme): then nothing is known, "auto" means 128 and nothing is refused.
    """
    text = config.get("text_config")
    cfg = text if isinstance(text, Mapping) else config

    def size(key: str) -> int | None:
        v = cfg.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    hidden = size("hidden_size")
    if hidden is None:
        return {}
    out = {"hidden_size": hidden}
    if (inter := size("intermediate_size")) is not None:
        out["intermediate_size"] = inter
    heads = size("num_attention_heads")
    head_dim = size("head_dim") or (hidden // heads if heads else None)
    if heads and head_dim:
        out["num_attention_heads*head_dim"] = heads * head_dim
    return out


def auto_group_size(inputs: Mapping[str, int]) -> int:
    """The largest of AUTO_GROUP_SIZES that divides every input size.

    -1 (one group per output row, GPTQ's per-channel mode) when none does: the GPU kernels take
    it for any input size, and the recorded settings say what was chosen. The CPU kernel takes
    no group size for such a model (`cpu_problem`).
    """
    for group in AUTO_GROUP_SIZES:
        if all(n % group == 0 for n in inputs.values()):
            return group
    return -1


def undivided(group: int, inputs: Mapping[str, int]) -> dict[str, int]:
    """The input sizes `group` does not divide (-1 divides every size: one group per row)."""
    return {} if group <= 0 else {k: n for k, n in inputs.items() if n % group}


def group_size_problem(group: int, inputs: Mapping[str, int]) -> str | None:
    """Why `group` cannot quantize layers of these input sizes, and the sizes that can; None: it can."""
    bad = undivided(group, inputs)
    if not bad:
        return None

    choices = REGISTRY["gptq-int4"].options["group_size"][1] or ()
    fits = [str(g) for g in choices if isinstance(g, int) and g > 0 and not undivided(g, inputs)]
    sizes = ", ".join(f"{k} {n}" for k, n in bad.items())
    return f"{group} does not divide its {sizes}; group sizes that would: {', '.join([*fits, 'auto'])}"


def cpu_problem(group: int, inputs: Mapping[str, int]) -> str | None:
    """Why torch's CPU int4 kernel cannot run layers quantized with `group`; None: it can.

    That kernel takes groups of 32, 64, 128 or 256 only, and -1 makes each layer's whole input
    one group, so -1 runs there only for toy sizes. Found before quantizing, the minutes GPTQ
    takes are not spent on a checkpoint whose every row would fail at its first forward pass.
    """
    if group > 0:
        return None
    bad = {k: n for k, n in inputs.items() if n not in CPU_GROUP_SIZES}
    if not bad:
        return None
    sizes = ", ".join(f"{k} {n}" for k, n in bad.items())
    fits = [str(g) for g in CPU_GROUP_SIZES if not undivided(g, inputs)]
    remedy = f"use group_size {' or '.join(fits)} (or auto)" if fits else "no group size divides them all: use a GPU"
    return (
        f"group_size -1 (one group per row) on the CPU: torch's int4 kernel takes groups of "
        f"{', '.join(map(str, CPU_GROUP_SIZES))} only, not rows of {sizes}; {remedy}"
    )


def choose_group_size(value: Any, inputs: Mapping[str, int]) -> tuple[int, bool]:
    """The group size to quantize with, and whether it was chosen ("auto"); raises GroupSizeError."""
    if value == "auto":
        return auto_group_size(inputs), True
    problem = group_size_problem(int(value), inputs)
    if problem is not None:
        raise GroupSizeError(f"group_size {problem}")
    return int(value), False


def check_sweep(sweep: Sweep) -> None:
    """Refuse, before anything starts, an explicit group_size that does not divide a model's layers.

    Reads each model's config as the context check does (rayq.planning.context.model_config: on this
    machine, no weights, no network); a model whose config is not here is left to its host,
    which refuses the same way when it loads.
    """
    from rayq.planning import context

    problems = []
    for name in sweep.spec.precisions:
        info = get(name)
        if info.family != "gptq":
            continue
        value = {**info.defaults, **sweep.spec.precision_options.get(name, {})}.get("group_size", "auto")
        if value == "auto":
            continue
        for i, model in enumerate(sweep.spec.models):
            config = context.model_config(model)
            problem = group_size_problem(int(value), layer_inputs(config) if config is not None else {})
            if problem is not None:
                problems.append(f"precision_options.{name}.group_size: models[{i}] {model.name}: {problem}")
    if problems:
        raise GroupSizeError(f"{sweep.path}: {'; '.join(problems)}")

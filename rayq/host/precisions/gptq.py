"""GPTQ 4-bit through GPTQModel (the maintained successor of auto-gptq, which cannot run with
transformers 5 nor quantize without CUDA).

A model is quantized once per (source, revision, settings) into a content-addressed cache;
every later host, resumed sweep or racing actor loads the cached checkpoint. A file lock
serialises quantization and the checkpoint appears by an atomic rename, so two actors racing
for it never see a half-written one. Quantization time, peak memory and GPTQ's own per-layer
loss are stored beside the checkpoint and reported with every load.

Facts this code relies on (GPTQModel 7.6.0, measured on a 2-core CPU): `GPTQMODEL_CPU_WORKERS`
must be >= 2 or quantization refuses to start; calibration texts of 10 tokens or fewer are
silently dropped; `act_group_aware` must be off when group_size is -1; the CPU kernels need
group sizes of 32, 64, 128 or 256 that divide every layer's input size; it writes ./logs in
the working directory.

That last fact is why the default group size is "auto": 128 (GPTQ's usual size, and rayq's
default before "auto") does not divide the bundled model's hidden size of 576, and every row
failed at the first forward pass. "auto" takes the largest of 128, 64 and 32 that divides
every quantized layer's input size as the model's config gives them; a model where 128
divides them all keeps exactly the settings, and so the cache key, it had before. An explicit
size that does not divide them is refused by `rayq plan` and before a sweep starts when the
config is on this machine (`check_sweep`), else when the host loads the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rayq.catalog.bundled import cache_dir, file_lock
from rayq.catalog.precisions import PrecisionInfo
from rayq.host.precisions.pretrained import from_pretrained
from rayq.planning.gptq_groups import GroupSizeError, choose_group_size, cpu_problem, layer_inputs

CALIBRATION_FILE = Path(__file__).with_name("calibration.txt")
META = "rayq_gptq.json"


def _model_config(model_dir: str, options: dict[str, Any]) -> dict[str, Any]:
    file = Path(model_dir) / "config.json"
    if file.is_file():
        return json.loads(file.read_text(encoding="utf-8"))
    from transformers import AutoConfig  # a hub id: the config comes as the weights will

    config = AutoConfig.from_pretrained(
        model_dir, revision=options.get("revision"), trust_remote_code=bool(options.get("trust_remote_code", False))
    )
    return config.to_dict()


def settings_of(options: dict[str, Any]) -> dict[str, Any]:
    texts = options.get("calibration_texts") or CALIBRATION_FILE.read_text(encoding="utf-8").splitlines()
    texts = [t.strip() for t in texts if t.strip()]
    count = int(options.get("calibration_count") or len(texts))
    return {
        "bits": int(options.get("bits", 4)),
        "group_size": int(options.get("group_size", 128)),
        "desc_act": bool(options.get("desc_act", False)),
        "sym": bool(options.get("sym", True)),
        "calibration_texts": texts[:count],
    }


def settings_for(options: dict[str, Any], inputs: Mapping[str, int]) -> tuple[dict[str, Any], bool]:
    """The settings to quantize with, which are the cache key's, and whether the group size was chosen.

    How the group size was chosen stays out of the settings: a model where "auto" means 128
    keeps the key, and so the checkpoint, that the default of 128 gave it before.
    """
    group, chosen = choose_group_size(options.get("group_size", "auto"), inputs)
    return settings_of({**options, "group_size": group}), chosen


def weight_format(info: PrecisionInfo, settings: dict[str, Any]) -> tuple[str, float | None]:
    """The format and stored bits per weight of the group size the host quantized with.

    A group holds an fp16 scale and a 4-bit zero; with one group per row (-1) their share
    depends on the row's length, which the settings do not hold.
    """
    group = (settings.get("gptq") or {}).get("group_size")
    if group == -1:
        return "int4 per-channel (GPTQ)", None
    if isinstance(group, int) and group > 0:
        return f"int4 g{group} (GPTQ)", 4 + (16 + 4) / group
    return "int4 g? (GPTQ)", 8 * (info.bytes_per_param + info.scale_bytes_per_param)


def cache_key(model_dir: str, revision: str | None, settings: dict[str, Any]) -> str:
    version = importlib.metadata.version("gptqmodel")
    blob = json.dumps({"source": model_dir, "revision": revision, "settings": settings, "gptqmodel": version},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _in_dir(path: Path) -> Iterator[None]:
    """GPTQModel writes ./logs; keep it out of the user's (or Ray's) working directory."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def quantize(model_dir: str, target: Path, settings: dict[str, Any], device: str) -> dict[str, Any]:
    """Quantize `model_dir` into `target` (created atomically); returns what was measured."""
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, int(os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))))
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    from rayq.host.decode import peak_memory_mb

    group = settings["group_size"]
    qcfg = QuantizeConfig(
        bits=settings["bits"], group_size=group, desc_act=settings["desc_act"], sym=settings["sym"],
        act_group_aware=group > 0,
    )  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with _in_dir(work):
            gm = GPTQModel.load(
                model_dir, qcfg, device=device, dtype=torch.float32 if device == "cpu" else torch.float16
            )
            log = gm.quantize(settings["calibration_texts"], batch_size=4)
            out = work / "checkpoint"
            gm.save(str(out))
        meta = {
            "quantize_s": time.perf_counter() - start,
            "quantize_peak_mb": peak_memory_mb(torch.device(device)),
            "quant_log": [
                {"layer": r.get("layer"), "module": r.get("module"), "loss": float(r["loss"])}
                for r in (log or {}).get("gptq", [])
                if r.get("loss") not in (None, "")
            ],
            "settings": settings,
        }
        (out / META).write_text(json.dumps(meta, indent=1))
        os.replace(out, target)  # atomic: readers see the whole checkpoint or none
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def load(info: PrecisionInfo, model_dir: str, device: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torch

    target, recorded = checkpoint(model_dir, device, options)
    model = from_pretrained(
        str(target),
        device,
        {"max_memory": options.get("max_memory")},
        dtype=torch.float32 if device == "cpu" else torch.float16,
    )
    model._rayq_gptq_dir = str(target)  # for dequantize(): the packed tensors as saved
    meta = json.loads((target / META).read_text())
    return model, {**recorded, "layer_errors": _layer_errors(model, meta["quant_log"])}


def _cached(key: str) -> Path | None:
    """A finished checkpoint for `key`, whichever model name it was first made under.

    The key is of the weights and the settings, not of the sweep's name for the model: one model
    run under two names (on two engines, say) is quantized once. The name before the key only
    helps a person reading the cache.
    """
    found = sorted(p for p in (cache_dir() / "gptq").glob(f"*-{key}") if (p / META).is_file())
    return found[0] if found else None


def checkpoint(model_dir: str, device: str, options: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The GPTQ checkpoint of `model_dir` for these options (quantized into the cache once), and
    the settings a host records. The transformers host loads it; the vLLM host hands it to vLLM."""

    inputs = layer_inputs(_model_config(model_dir, options))
    settings, chosen = settings_for(options, inputs)
    if device == "cpu" and (problem := cpu_problem(settings["group_size"], inputs)) is not None:
        raise GroupSizeError(problem)
    key = cache_key(model_dir, options.get("revision"), settings)
    target = _cached(key) or cache_dir() / "gptq" / f"{options.get('model_name', 'model')}-{key}"
    hit = (target / META).is_file()
    if not hit:
        with file_lock(cache_dir() / "locks" / f"gptq-{key}.lock"):
            target = _cached(key) or target  # another host may have finished while this one waited
            hit = (target / META).is_file()
            if not hit:
                # GPTQ quantizes layer by layer, so one GPU does it even for a model sharded to run.
                quantize(model_dir, target, settings, "cuda:0" if device == "auto" else device)
    meta = json.loads((target / META).read_text())
    recorded = {k: v for k, v in settings.items() if k != "calibration_texts"}
    recorded["calibration_count"] = len(settings["calibration_texts"])
    if chosen:
        recorded["group_size_auto"] = True
    return target, {
        "gptq": recorded,
        "cache_key": key,
        "cache_hit": hit,
        "checkpoint": str(target),
        "gptqmodel": importlib.metadata.version("gptqmodel"),
        # quantization cost belongs to the host that paid it
        "quantize_s": None if hit else meta["quantize_s"],
        "quantize_peak_mb": None if hit else meta["quantize_peak_mb"],
    }


def _layer_errors(model: Any, log: list[dict[str, Any]]) -> dict[str, float]:
    """GPTQ's loss per layer, keyed by the module's full name (log records say layer 3, mlp.down_proj)."""
    names = [n for n, _ in model.named_modules()]
    out = {}
    for r in log:
        suffix = f".{r['layer']}.{r['module']}"
        match = next((n for n in names if n.endswith(suffix)), None)
        if match is not None:
            out[match] = r["loss"]
    return out


def unpack(qweight: Any, qzeros: Any, scales: Any, g_idx: Any, bits: int = 4) -> Any:
    """A saved (checkpoint format v1) GPTQ layer back to a float [out, in] weight like nn.Linear's."""
    import torch

    maxq = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    w = ((qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & maxq).reshape(-1, qweight.shape[1])  # [in, out]
    z = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & maxq).reshape(qzeros.shape[0], -1) + 1  # v1 stores zero-1
    g = g_idx.long()
    return (scales.float()[g] * (w.float() - z.float()[g])).t().contiguous()


def dequantizer(model: Any) -> Callable[[str, Any], Any]:
    """Read a layer's packed tensors from the saved checkpoint: the loaded kernels repack them."""
    from safetensors import safe_open

    path = Path(getattr(model, "_rayq_gptq_dir", "")) / "model.safetensors"
    qc = getattr(model.config, "quantization_config", None)
    bits = int((qc if isinstance(qc, dict) else getattr(qc, "__dict__", {})).get("bits", 4))

    def dequantize(name: str, module: Any) -> Any:
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as fh:
            keys = set(fh.keys())
            if f"{name}.qweight" not in keys:
                w = getattr(module, "weight", None)  # left unquantized (e.g. lm_head)
                return None if w is None else w.detach().float()
            t = {k: fh.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        return unpack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)

    return dequantize

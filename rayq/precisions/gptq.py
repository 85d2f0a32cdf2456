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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rayq.precisions import PrecisionInfo, from_pretrained

CALIBRATION_FILE = Path(__file__).with_name("calibration.txt")
META = "rayq_gptq.json"


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

    from rayq.decode import peak_memory_mb

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

    from rayq.sources import cache_dir, file_lock

    settings = settings_of(options)
    key = cache_key(model_dir, options.get("revision"), settings)
    target = cache_dir() / "gptq" / f"{options.get('model_name', 'model')}-{key}"
    hit = (target / META).is_file()
    if not hit:
        with file_lock(cache_dir() / "locks" / f"gptq-{key}.lock"):
            hit = (target / META).is_file()  # another host may have finished while this one waited
            if not hit:
                # GPTQ quantizes layer by layer, so one GPU does it even for a model sharded to run.
                quantize(model_dir, target, settings, "cuda:0" if device == "auto" else device)
    meta = json.loads((target / META).read_text())
    model = from_pretrained(
        str(target),
        device,
        {"max_memory": options.get("max_memory")},
        dtype=torch.float32 if device == "cpu" else torch.float16,
    )
    model._rayq_gptq_dir = str(target)  # for dequantize(): the packed tensors as saved
    recorded = {k: v for k, v in settings.items() if k != "calibration_texts"}
    recorded["calibration_count"] = len(settings["calibration_texts"])
    return model, {
        "gptq": recorded,
        "cache_key": key,
        "cache_hit": hit,
        "checkpoint": str(target),
        "gptqmodel": importlib.metadata.version("gptqmodel"),
        # quantization cost belongs to the host that paid it
        "quantize_s": None if hit else meta["quantize_s"],
        "quantize_peak_mb": None if hit else meta["quantize_peak_mb"],
        "layer_errors": _layer_errors(model, meta["quant_log"]),
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

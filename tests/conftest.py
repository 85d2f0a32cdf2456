"""Shared fixtures: a tiny random-weight Llama built in the test, and sweep-file helpers.

The tiny model is a real transformers model (2 layers, hidden 64, vocabulary 128) with a real word-level
tokenizer, saved to disk and loaded through the same `path:` source a user would use; it
generates English words (at random) in milliseconds, so the engine is exercised end to
end without the 35-second load of the bundled model.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One Ray auth token for the whole test session, set before any Ray starts: Ray's client keeps
# the first token of a process, and the clusters the tests start (ray_cluster) take theirs from
# the environment, where start_ray leaves none of its own (rayq.execution.cluster).
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# Ray starts a worker per CPU when the first driver connects; in the suite's many short-lived
# clusters most of them never get a task and only cost their start-up (44 CPU-s of a run).
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

WORDS = (
    "the a of and my name hello life easy techie looks like written earning current eating habits "
    "millennial genz percentage adore exercise ai to in is it that was for on with as at by this from be are or an "
    "london city river bridge market music science computer energy climate ocean forest "
    "mountain garden school teacher student book library history future people family "
    "friend coffee dinner morning evening summer winter travel train ticket money bank "
    "stock broker price market actor singer movie song dance sport football tennis "
    "exercise health food water bread apple orange health doctor hospital robot data "
    "cloud network internet phone game story poem shakespeare king queen castle war "
    "peace world order global warming planet star moon sun light dark green blue red rain"
).split()


def word_tokenizer(words: list[str]) -> Any:
    """A real word-level fast tokenizer: the four specials, then `words`, lowercased."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(vocab_size: int, seed: int = 0, **overrides: Any) -> Any:
    """A random-weight 2-layer Llama (hidden 64) whose weights spread widely (initializer 0.2),
    so that its next-token distributions are far from uniform."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "initializer_range": 0.2, **overrides,
    })  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    tokenizer = word_tokenizer(sorted(set(WORDS)))
    # bitsandbytes' 4-bit CPU kernels need every quantized layer's output size divisible by 32.
    assert len(tokenizer) % 32 == 0, len(tokenizer)
    model = tiny_llama(len(tokenizer), seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The test files that take longest (end-to-end runs on real Ray clusters and models), longest
# first, as measured by `pytest --durations` under `make test` (the GPTQ one with an empty
# cache). Collected first, so that `pytest -n` (make test: xdist, whole files per worker) starts
# them early instead of leaving one of them to run alone at the end.
LONGEST_FIRST = (
    "test_vllm_gptq.py", "test_results_dir.py", "test_run.py", "test_scheduling_cluster.py", "test_faults.py",
    "test_vllm.py", "test_vllm_resume.py", "test_bench.py", "test_bench_cluster.py", "test_cluster.py",
    "test_design_space_run.py", "test_launcher.py", "test_bundled.py", "test_report.py", "test_context.py",
    "test_library.py", "test_store_uri.py", "test_gptq.py", "test_decode_work.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A private local Ray for one test module, as `rayq run` starts it, shut down after."""
    import ray

    from rayq.execution.driver import start_ray

    start_ray(None)
    yield
    ray.shutdown()


def sweep_dict(model_path: Path, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "tiny",
        "models": [{"name": "tiny", "path": str(model_path)}],
        "precisions": ["fp32"],
        "prompts": ["Life in London", "Global warming and AI", "Hello, my name is"],
        "grid": {"max_new_tokens": [4, 8], "temperature": [0.7, 1.0], "top_k": [1, 50]},
        "seeds": 1,
        "runtime": {"num_cpus": 1, "flush_every": 4},
    }
    for k, v in overrides.items():
        base[k] = v
    return base


def write_sweep(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# The environment for a `rayq run` subprocess whose output is read as it comes.
QUIET = {**os.environ, "PYTHONUNBUFFERED": "1"}


def vllm_sweep(**overrides: object) -> dict:
    """The bundled model on the vLLM engine in fp32: 3 prompts x 4 grid cells, `overrides` on top."""
    data: dict = {
        "name": "v",
        "models": [{"name": "smol", "bundled": "smollm2-135m-instruct"}],
        "precisions": ["fp32"],
        "prompts": ["Life in London", "Hello, my name is", "Global warming and AI"],
        "grid": {"max_new_tokens": [8], "temperature": [0.5, 1.0], "top_k": [1, 50]},
        "runtime": {"engine": "vllm", "num_cpus": 1},
    }
    data.update(overrides)
    return data


def rayq_cmd() -> list[str]:
    return [sys.executable, "-m", "rayq"]


@contextmanager
def ray_cluster(nodes: list[dict[str, Any]]) -> Iterator[Any]:
    """A `ray.cluster_utils.Cluster` on this machine: a head with 2 CPUs and no GPU plus
    `nodes` (logical GPUs), this process connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    for node in nodes:
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False, include_dashboard=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


# -- object storage: a moto S3 server on 127.0.0.1 ---------------------------------

BUCKET = "rayq-results"


@dataclass(frozen=True)
class S3:
    endpoint: str
    client: Any

    def uri(self, prefix: str) -> str:
        """The URI `rayq run --output` takes: pyarrow's options in the query, keys from AWS_*."""
        return f"s3://{BUCKET}/{prefix}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def keys(self, prefix: str) -> list[str]:
        """The objects under `prefix`, less the empty `dir/` markers pyarrow leaves after a delete."""
        listing = self.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
        keys = (o["Key"].removeprefix(f"{prefix}/") for o in listing.get("Contents", []))
        return sorted(k for k in keys if k and not k.endswith("/"))


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    with pytest.MonkeyPatch.context() as mp:
        # Set before any Ray starts: Ray's workers inherit the driver's environment at ray.init.
        for var in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)  # the endpoint is in the URI
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a metadata service for keys
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            yield S3(endpoint, client)
        finally:
            server.stop()

"""The one preflight (rayq.store.preflight): every refusal, through all four entry points, in the same words.

`rayq plan FILE`, `rayq.plan()`, `rayq run FILE` and `rayq.run()` call the same function, so
each kind of refusal below is asserted to come out of all four as the same single line: exit
status 2 on the command line, a RayqError in Python, and for a run nothing written (no
manifest.json, no lock, no results directory where there was none) and Ray never started.
The CLI runs in this process (rayq.cli.main), which is what makes "Ray never started" checkable.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import rayq
from rayq import cli
from rayq.catalog import precisions, vllm_support
from rayq.planning import planner, spec
from rayq.store.dataset import Store, completion_row
from tests.conftest import WORDS, word_tokenizer, write_sweep

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HQQ_MISSING = bool(precisions.missing_packages(precisions.get("fp32-qkv4hqq")))
AVX2_ONLY = "fpu sse4_2 avx avx2 fma"
AVX512 = f"{AVX2_ONLY} avx512f avx512bw avx512vl avx512dq"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with a config and a real tokenizer and no weights: all the preflight reads."""
    path = tmp_path_factory.mktemp("pf-model")
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 160, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    word_tokenizer(sorted(set(WORDS))).save_pretrained(path)
    return path


def _sweep(model: Path, **over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "pf",
        "models": [{"name": "tiny", "path": str(model)}],
        "precisions": ["fp32"],
        "prompts": ["Life in London", "Hello my name is"],
        "grid": {"max_new_tokens": [8]},
        "runtime": {"num_cpus": 1},
    }
    return data | over


def _other_sweeps_rows(out: Path, model: Path) -> None:
    """Results of another sweep (named 'other') at `out`, written as a run writes them."""
    other = spec.parse(_sweep(model, name="other"), "other.yaml")
    rows = [
        completion_row("other", c.to_dict(), status="ok", text="x")
        for c in planner.iter_completions(other, other.spec.models[0], "fp32")
    ]
    Store(out).write("tiny", "fp32", rows)


@dataclass(frozen=True)
class Case:
    kind: str
    sweep: Callable[[Path], dict[str, Any]]
    expect: str  # a part of the one line every entry point says
    error: str  # the RayqError subclass
    env: dict[str, str] = field(default_factory=dict)
    output: str = "fresh"  # fresh (no directory), file (a file), other (another sweep's results)


CASES = [
    Case(
        "context",
        lambda m: _sweep(m, grid={"max_new_tokens": [8, 100]}),
        "prompts past the model's context: models[0] tiny: prompt 1 (4 tokens) + max_new_tokens 100 = 104 > its "
        "context of 64 tokens (and 1 more prompt/length pairs)",
        "ContextError",
    ),
    Case(
        "gptq group size",
        lambda m: _sweep(m, precisions=["gptq-int4"], precision_options={"gptq-int4": {"group_size": 256}}),
        "precision_options.gptq-int4.group_size: models[0] tiny: 256 does not divide its hidden_size 64",
        "GroupSizeError",
    ),
    Case(
        "engine x precision x device",
        lambda m: _sweep(m, precisions=["bnb-nf4-dq"], runtime={"engine": "vllm", "num_gpus": 0}),
        "refused before launch (runtime.num_gpus 0: CPU hosts): host tiny/bnb-nf4-dq: engine vllm on cpu: "
        "vLLM runs bitsandbytes on NVIDIA GPUs only",
        "EngineRefusedError",
    ),
    pytest.param(
        Case(
            "vLLM GPTQ without its CPU kernel",
            lambda m: _sweep(m, precisions=["gptq-int4"], runtime={"engine": "vllm", "num_gpus": 0}),
            "host tiny/gptq-int4: engine vllm on cpu: the vLLM installed here lacks cpu_gemm_wna16, its GPTQ W4A16 "
            "CPU kernel, on this CPU without AVX-512 (_C_AVX2.",
            "EngineRefusedError",
            env={vllm_support.CPU_FLAGS_ENV: AVX2_ONLY},
        ),
        marks=pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed"),
        id="vLLM GPTQ without its CPU kernel",
    ),
    pytest.param(
        Case(
            "missing package",
            lambda m: _sweep(m, precisions=["fp32", "fp32-qkv4hqq"]),
            "precision fp32-qkv4hqq needs hqq, which is not installed here (the hosts run on this machine): "
            "install it, or take it out of the sweep",
            "MissingPackageError",
        ),
        marks=pytest.mark.skipif(not HQQ_MISSING, reason="hqq is installed here"),
        id="missing package",
    ),
    Case("output is a file", _sweep, "cannot hold results: ", "ResultsDirError", output="file"),
    Case(
        "directory holding another sweep",
        _sweep,
        "holds sweep 'other', not 'pf': use another --output, or pass --allow-sweep-change",
        "SweepMismatchError",
        output="other",
    ),
]


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and captured.out == "", captured
    assert lines[0].startswith("rayq: ")
    return status, lines[0].removeprefix("rayq: ")


def _library(call: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(rayq.RayqError) as e:
        call()
    assert len(str(e.value).splitlines()) == 1, str(e.value)
    return type(e.value).__name__, str(e.value)


@pytest.mark.parametrize("case", [c if not isinstance(c, Case) else pytest.param(c, id=c.kind) for c in CASES])
def test_every_entry_point_refuses_the_same_sweep_in_the_same_one_line(
    case: Case, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    file = write_sweep(tmp_path / "sweep.yaml", case.sweep(model_dir))
    out = tmp_path / "out"
    if case.output == "file":
        out.write_text("not a directory")
    elif case.output == "other":
        _other_sweeps_rows(out, model_dir)
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None

    said = {}
    status, said["rayq plan"] = _cli(capsys, "plan", str(file), "--output", str(out))
    assert status == 2
    error, said["rayq.plan()"] = _library(lambda: rayq.plan(file, out))
    assert error == case.error
    status, said["rayq run"] = _cli(capsys, "run", str(file), "--output", str(out))
    assert status == 2
    error, said["rayq.run()"] = _library(lambda: rayq.run(file, out, quiet=True))
    assert error == case.error

    assert len(set(said.values())) == 1, said
    assert case.expect in said["rayq plan"], said["rayq plan"]
    assert not _ray_started()
    after = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    assert after == before and "manifest.json" not in (after or []) and "run.lock" not in (after or [])


def test_the_kernel_probe_reads_the_library_vllm_would_import(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = lambda text: frozenset(text.split())  # noqa: E731
    if vllm_support.platform.machine().lower() in ("x86_64", "amd64"):
        assert vllm_support.kernel_library(flags(AVX2_ONLY)) == "_C_AVX2"
        assert vllm_support.kernel_library(flags(AVX512)) == "_C_AVX512"
        assert vllm_support.kernel_library(flags(AVX512 + " avx512_bf16")) == "_C"
    if not HAS_VLLM:
        assert vllm_support.gptq_cpu_kernel_problem() is None  # the engine's missing package says it
        return
    monkeypatch.setenv(vllm_support.CPU_FLAGS_ENV, AVX2_ONLY)
    problem = vllm_support.gptq_cpu_kernel_problem()
    assert problem is not None and "lacks cpu_gemm_wna16" in problem and "without AVX-512" in problem
    monkeypatch.setenv(vllm_support.CPU_FLAGS_ENV, AVX512)
    assert vllm_support.gptq_cpu_kernel_problem() is None


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_vllm_gptq_on_a_cpu_with_the_kernel_is_planned(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllm_support.CPU_FLAGS_ENV, AVX512)
    data = _sweep(model_dir, precisions=["gptq-int4"], runtime={"engine": "vllm", "num_gpus": 0})
    assert rayq.plan(data).completions == 2


def test_num_gpus_auto_on_a_machine_without_gpus_means_cpu_hosts(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what a local Ray would see: no GPU
    data = _sweep(model_dir, precisions=["bnb-nf4-dq"], runtime={"engine": "vllm"})
    _, said = _library(lambda: rayq.plan(data))
    assert "(runtime.num_gpus auto and no NVIDIA GPU here: CPU hosts): host tiny/bnb-nf4-dq" in said
    # On a cluster the devices are known once placed (the driver asks again then); its workers'
    # packages are theirs: neither is refused here.
    assert rayq.plan(data, address="ray://head:10001").completions == 2


@pytest.mark.skipif(not HQQ_MISSING, reason="hqq is installed here")
def test_a_package_missing_here_is_a_warning_for_a_cluster_run(model_dir: Path) -> None:
    from rayq.store.preflight import preflight

    sweep = spec.parse(_sweep(model_dir, precisions=["fp32-qkv4hqq"]), "s.yaml")
    pre = preflight(sweep, address="auto")
    assert pre.warnings == ("precision fp32-qkv4hqq needs hqq, which is not installed here",)

"""Prompts + max_new_tokens against the model's context: the check, the refusal, and the rows' record."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rayq.execution.driver import run_sweep
from rayq.host.config import HostConfig
from rayq.host.transformers_host import ModelHost
from rayq.planning import context, planner, spec
from tests.conftest import WORDS, build_tiny_model, rayq_cmd, sweep_dict, write_sweep

REPO = Path(__file__).resolve().parent.parent
# 700 words of the tiny model's vocabulary: exactly 700 tokens (its tokenizer adds no BOS),
# past its 512-token context on its own.
LONG_PROMPT = " ".join(WORDS[i % len(WORDS)] for i in range(700))
SHORT_PROMPTS = ["Life in London", "Global warming and AI", "Hello, my name is"]
REFUSED_TAIL = (
    "shorten them, lower max_new_tokens, or allow it with --allow-past-context (runtime.allow_past_context: true)"
)


def _long_sweep(tiny_model: Path, **kw: Any) -> dict[str, Any]:
    return sweep_dict(tiny_model, prompts=[*SHORT_PROMPTS, LONG_PROMPT], grid={"max_new_tokens": [8, 1000]}, **kw)


def _plan(tmp_path: Path, data: dict[str, Any], *flags: str, env: dict[str, str] | None = None) -> Any:
    f = write_sweep(tmp_path / "sweep.yaml", data)
    return subprocess.run(
        [*rayq_cmd(), "plan", str(f), *flags],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_plan_refuses_a_prompt_past_the_context_in_one_line(tmp_path: Path, tiny_model: Path) -> None:
    proc = _plan(tmp_path, _long_sweep(tiny_model))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""  # refused before anything was printed
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    # the 700-token prompt is counted exactly (the tokenizer was loaded: the byte bound was not enough);
    # with max_new_tokens 1000 every prompt is past 512: 4 prompts x 1000 and the long one x 8
    assert (
        "models[0] tiny: prompt 3 (700 tokens) + max_new_tokens 1000 = 1700 > its context of 512 tokens "
        "(and 4 more prompt/length pairs)"
    ) in lines[0]
    assert lines[0].startswith("rayq: ") and lines[0].endswith(REFUSED_TAIL)


@pytest.mark.parametrize("how", ["flag", "runtime"])
def test_allowing_it_plans_with_a_warning(tmp_path: Path, tiny_model: Path, how: str) -> None:
    if how == "flag":
        proc = _plan(tmp_path, _long_sweep(tiny_model), "--allow-past-context")
    else:
        proc = _plan(tmp_path, _long_sweep(tiny_model, runtime={"num_cpus": 1, "allow_past_context": True}))
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stdout.splitlines() if "warning: context:" in line]
    assert len(warning) == 1 and "prompt 3 (700 tokens) + max_new_tokens 1000 = 1700 > its context of 512" in warning[0]
    assert "nothing started" in proc.stdout


def test_a_fitting_sweep_says_it_fits(tmp_path: Path, tiny_model: Path) -> None:
    proc = _plan(tmp_path, sweep_dict(tiny_model))
    assert proc.returncode == 0, proc.stderr
    # the longest prompt's bound: 21 bytes + 4 tokens a tokenizer may add
    assert "  context: fits (longest prompt at most 25 tokens + max_new_tokens 8 <= 512) for tiny" in proc.stdout


def test_a_fitting_sweep_is_checked_without_transformers(tiny_model: Path) -> None:
    """The byte bound proves the fit, so `rayq plan` on a good sweep stays fast."""
    code = (
        "import sys; from rayq.planning import context, spec; "
        "from tests.conftest import sweep_dict; from pathlib import Path; "
        f"s = spec.parse(sweep_dict(Path({str(tiny_model)!r}), grid={{'max_new_tokens': [400]}})); "
        "c = context.check_models(s); assert c[0].context == 512 and not c[0].overflows, c; "
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_a_hub_model_of_unknown_context_is_not_checked(tmp_path: Path, tiny_model: Path) -> None:
    models = [{"name": "remote", "hub": "nobody/not-cached", "size": {"params": "7B"}}]
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    proc = _plan(tmp_path, _long_sweep(tiny_model, models=models, precisions=["fp16"]), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "context" in line]
    assert lines == [
        "  context: not checked for remote: its context length is unknown here (give models[0].size.context)"
    ]


def test_a_hub_model_uses_size_context_and_never_downloads(tmp_path: Path, tiny_model: Path) -> None:
    """With size.context but no tokenizer on this machine, prompts the bound cannot clear are said, not refused."""
    models = [{"name": "remote", "hub": "nobody/not-cached", "size": {"params": "7B", "context": 4096}}]
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    proc = _plan(tmp_path, _long_sweep(tiny_model, models=models, precisions=["fp16"]), env=env)
    assert proc.returncode == 0, proc.stderr
    assert (
        "  context: not checked for remote (context 4096 tokens): 1 of its prompts may run past it, uncounted: "
        "its tokenizer is not in the local Hugging Face cache (the check downloads nothing)"
    ) in proc.stdout


def test_a_cached_hub_model_is_checked_from_the_cache(tmp_path: Path, tiny_model: Path) -> None:
    """Config and tokenizer from the local Hugging Face cache (local_files_only), as the host would load them."""
    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    models = [{"name": "cached", "hub": "tiny-org/tiny", "size": {"params": 20000, "context": 4096}}]
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = _plan(tmp_path, _long_sweep(tiny_model, models=models, precisions=["fp32"]), env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # the cached config's 512 wins over size.context, and the cached tokenizer counts exactly
    assert "models[0] cached: prompt 3 (700 tokens) + max_new_tokens 1000 = 1700 > its context of 512" in proc.stderr


def test_run_sweep_refuses_before_creating_the_output(tmp_path: Path, tiny_model: Path) -> None:
    sweep = spec.parse(_long_sweep(tiny_model), "long.yaml")
    out = tmp_path / "out"
    with pytest.raises(context.ContextError) as e:
        run_sweep(sweep, out, quiet=True)
    assert isinstance(e.value, spec.SpecError) and str(e.value).startswith("long.yaml: ")
    assert str(e.value).endswith(REFUSED_TAIL)
    assert not out.exists()


def test_check_context_lists_every_pair(tiny_model: Path) -> None:
    sweep = spec.parse(_long_sweep(tiny_model), "long.yaml")
    overflows = context.check_context(sweep)
    pairs = sorted((o.prompt_id, o.max_new_tokens) for o in overflows)
    assert pairs == [(0, 1000), (1, 1000), (2, 1000), (3, 8), (3, 1000)]
    assert {o.context for o in overflows} == {512} and {o.prompt_tokens for o in overflows if o.prompt_id == 3} == {700}
    assert context.describe_overflows(overflows) == (
        "models[0] tiny: prompt 3 (700 tokens) + max_new_tokens 1000 = 1700 > its context of 512 tokens "
        "(and 4 more prompt/length pairs)"
    )


def test_context_from_configs() -> None:
    assert context.context_from_config({"n_positions": 1024, "n_ctx": 1024}) == 1024  # GPT-2
    assert context.context_from_config({"seq_length": 2048}) == 2048
    nested = {"text_config": {"max_position_embeddings": 131072}, "vision_config": {"image_size": 896}}
    assert context.context_from_config(nested) == 131072
    assert context.context_from_config({"hidden_size": 64}) is None


def test_the_byte_bound_holds_for_normalized_text() -> None:
    assert context.prompt_token_bound("hello") == 5 + context.ADDED_TOKENS
    # NFD spells é as e + a combining accent: three bytes where NFC has two
    assert context.prompt_token_bound("café") == len("cafe\u0301".encode()) + context.ADDED_TOKENS


# Scripts where a token covers few characters: an average of characters per token is no bound there.
NON_ENGLISH = [
    "東京は日本の首都です。人口は約1400万人。",
    "🎉🚀👩\u200d👩\u200d👧\u200d👦 emoji and a ZWJ family 🏳️\u200d🌈",
    "한국어 텍스트입니다",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷺ ﬃ ㎏ Ⅻ",
    "Ünïcödé façade — naïve café",
]


def test_the_bound_holds_for_non_english_text_with_the_bundled_tokenizer(tiny_model: Path) -> None:
    """One bound (rayq.planning.tokens) for the context check and the KV cache estimate, and it holds
    for CJK, emoji and other scripts, counted by the bundled model's real byte-level BPE tokenizer."""
    from rayq.planning import placement, tokens

    assert context.prompt_token_bound is tokens.prompt_token_bound
    bundled = spec.ModelSpec(name="smol", bundled="smollm2-135m-instruct")
    counted = context.count_prompt_tokens(bundled, NON_ENGLISH)
    bounds = [tokens.prompt_token_bound(t) for t in NON_ENGLISH]
    assert all(b >= n for b, n in zip(bounds, counted, strict=True)), list(zip(bounds, counted, strict=True))
    # the memory estimate's old bound (characters / 2 + 16) fell short of the CJK and emoji prompts
    assert counted[0] > len(NON_ENGLISH[0]) // 2 + 16 and counted[1] > len(NON_ENGLISH[1]) // 2 + 16
    # the KV cache is sized for the longest prompt by the same bound, plus the longest max_new_tokens
    sweep = spec.parse(sweep_dict(tiny_model, prompts=NON_ENGLISH, grid={"max_new_tokens": [8, 32]}), "t.yaml")
    assert placement.decode_size(sweep, on_gpu=False)[0] == max(bounds) + 32


def test_the_bundled_models_context_without_loading_it() -> None:
    code = (
        "import sys; from rayq.planning import context, spec; "
        "m = spec.ModelSpec(name='s', bundled='smollm2-135m-instruct'); "
        "print(context.model_context(m)); "
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "8192", proc.stderr
    # the constant is the GGUF file's own metadata, read without its weights
    gguf = pytest.importorskip("gguf")
    from rayq.catalog.bundled import bundled_gguf

    field = gguf.GGUFReader(str(bundled_gguf("smollm2-135m-instruct"))).fields["llama.context_length"]
    assert int(field.parts[field.data[0]][0]) == 8192


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its config saying a 16-token context (generation runs past it regardless)."""
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-ctx16"))
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 16
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("protocol", ["serial", "batched"])
def test_the_host_marks_rows_past_the_context(short_context_model: Path, protocol: str) -> None:
    sweep = spec.parse(
        sweep_dict(
            short_context_model,
            prompts=["hello my name is"],  # 4 tokens
            grid={"max_new_tokens": [4, 40], "temperature": [0.0]},
            runtime={"allow_past_context": True},
        )
    )
    comps = [c.to_dict() for c in planner.iter_completions(sweep, sweep.spec.models[0], "fp32")]
    source = f"path:{short_context_model}"
    host = ModelHost(HostConfig(sweep="tiny", model="tiny", source=source, precision="fp32", protocol=protocol))
    assert host.info()["context_length"] == 16
    rows = {r["max_new_tokens"]: r for r in host.generate(comps)}
    assert rows[4]["status"] == "ok" and rows[4]["past_context"] is False  # 4 + at most 4 <= 16
    long = rows[40]
    assert long["status"] == "ok", long["error"]
    # greedy decoding of this model and prompt does not stop at EOS within 12 tokens
    assert long["n_prompt_tokens"] + long["n_new_tokens"] > 16 and long["past_context"] is True


def test_a_failed_row_does_not_say(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "config.json").write_text("{}")  # not a model: every row fails
    host = ModelHost(HostConfig(sweep="tiny", model="broken", source=f"path:{tmp_path}", precision="fp32"))
    sweep = spec.parse(sweep_dict(tiny_model))
    comp = next(planner.iter_completions(sweep, sweep.spec.models[0], "fp32")).to_dict()
    (row,) = host.generate([comp])
    assert row["status"] == "error" and row["past_context"] is None and host.info()["context_length"] is None

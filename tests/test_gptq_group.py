"""GPTQ's group size: "auto" picks one every quantized layer takes; one that a layer cannot take is refused early.

The CPU kernel needs the group size to divide each quantized layer's input size; the bundled
model's hidden size is 576, which the old default of 128 does not divide, so every one of its
gptq-int4 rows used to be an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rayq import cli, errors
from rayq.catalog.precisions import REGISTRY
from rayq.host.precisions import gptq
from rayq.planning import gptq_groups, planner, spec
from tests.conftest import build_tiny_model, sweep_dict, write_sweep

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64}
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32}


@pytest.mark.parametrize(
    ("config", "group"),
    [
        (SMOLLM2, 64),
        (LLAMA_7B, 128),
        ({"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 3}, 32),
        ({"hidden_size": 100, "intermediate_size": 400, "num_attention_heads": 4}, -1),  # no 32 divides 100
        ({"text_config": SMOLLM2}, 64),  # a multimodal config: the language model's layers
        ({"n_embd": 768}, 128),  # sizes under other names are unknown: the usual 128
    ],
)
def test_auto_takes_the_largest_group_every_layer_takes(config: dict[str, Any], group: int) -> None:
    assert gptq_groups.auto_group_size(gptq_groups.layer_inputs(config)) == group


def test_the_heads_width_counts_when_it_is_not_the_hidden_size() -> None:
    # o_proj's input is heads x head_dim (8 x 80 = 640 here), not hidden_size
    inputs = gptq_groups.layer_inputs(
        {"hidden_size": 4096, "intermediate_size": 8192, "num_attention_heads": 8, "head_dim": 80}
    )
    assert inputs == {"hidden_size": 4096, "intermediate_size": 8192, "num_attention_heads*head_dim": 640}
    assert gptq_groups.auto_group_size(inputs) == 128
    assert gptq_groups.auto_group_size({**inputs, "num_attention_heads*head_dim": 8 * 72}) == 64


def test_auto_keeps_the_settings_and_cache_key_a_128_model_had() -> None:
    """Checkpoints quantized with the old default of 128 stay valid: the key's settings are the same bytes."""
    texts = [t.strip() for t in gptq.CALIBRATION_FILE.read_text(encoding="utf-8").splitlines() if t.strip()]
    before = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "calibration_texts": texts}
    defaults = REGISTRY["gptq-int4"].defaults
    assert defaults == {"group_size": "auto"}
    settings, chosen = gptq.settings_for(dict(defaults), gptq_groups.layer_inputs(LLAMA_7B))
    assert chosen
    assert json.dumps(settings, sort_keys=True) == json.dumps(before, sort_keys=True)
    settings, chosen = gptq.settings_for({**defaults, "group_size": 128}, gptq_groups.layer_inputs(LLAMA_7B))
    assert not chosen and json.dumps(settings, sort_keys=True) == json.dumps(before, sort_keys=True)


def test_an_explicit_group_that_does_not_divide_is_refused_naming_what_would() -> None:
    with pytest.raises(gptq_groups.GroupSizeError) as e:
        gptq.settings_for({"group_size": 128}, gptq_groups.layer_inputs(SMOLLM2))
    assert str(e.value) == (
        "group_size 128 does not divide its hidden_size 576, num_attention_heads*head_dim 576; "
        "group sizes that would: 32, 64, auto"
    )
    assert gptq.settings_for({"group_size": -1}, gptq_groups.layer_inputs(SMOLLM2))[0]["group_size"] == -1


def _plan(path: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["plan", str(write_sweep(path, data))])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_refuses_a_group_size_the_bundled_model_cannot_take(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bundled model's sizes are known without converting its GGUF file."""
    data = sweep_dict(tmp_path, precisions=["gptq-int4"], precision_options={"gptq-int4": {"group_size": 128}})
    data["models"] = [{"name": "smol", "bundled": "smollm2-135m-instruct"}]
    code, out, err = _plan(tmp_path / "sweep.yaml", data, capsys)
    assert code == errors.EXIT_REFUSED and out == "", out
    assert err.strip() == (
        f"rayq: {tmp_path / 'sweep.yaml'}: precision_options.gptq-int4.group_size: models[0] smol: "
        "128 does not divide its hidden_size 576, num_attention_heads*head_dim 576; "
        "group sizes that would: 32, 64, auto"
    )


def test_plan_reads_a_local_models_config_and_accepts_auto(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = sweep_dict(tiny_model, precisions=["gptq-int4"], precision_options={"gptq-int4": {"group_size": 128}})
    code, _, err = _plan(tmp_path / "sweep.yaml", data, capsys)
    assert code == errors.EXIT_REFUSED
    assert "models[0] tiny: 128 does not divide its hidden_size 64, num_attention_heads*head_dim 64" in err
    for options in ({}, {"gptq-int4": {"group_size": "auto"}}, {"gptq-int4": {"group_size": 64}}):
        code, out, err = _plan(tmp_path / "sweep.yaml", {**data, "precision_options": options}, capsys)
        assert code == errors.EXIT_OK, err
        assert "nothing started" in out


def test_a_model_whose_config_is_not_here_is_left_to_its_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = sweep_dict(tmp_path, precisions=["gptq-int4"], precision_options={"gptq-int4": {"group_size": 128}})
    data["models"] = [{"name": "far", "hub": "rayq-tests/not-a-model-anyone-has"}]
    code, out, err = _plan(tmp_path / "sweep.yaml", data, capsys)
    assert code == errors.EXIT_OK, err
    assert "nothing started" in out


def test_run_refuses_it_before_creating_the_output(tmp_path: Path, tiny_model: Path) -> None:
    import rayq

    data = sweep_dict(tiny_model, precisions=["gptq-int4"], precision_options={"gptq-int4": {"group_size": 128}})
    out = tmp_path / "results"
    with pytest.raises(gptq_groups.GroupSizeError, match="models\\[0\\] tiny: 128 does not divide"):
        rayq.run(data, out, quiet=True)
    assert not out.exists()
    with pytest.raises(gptq_groups.GroupSizeError):
        rayq.plan(data)


def test_the_host_refuses_it_when_no_config_was_read_before(tiny_model: Path) -> None:
    pytest.importorskip("gptqmodel", reason="GPTQModel is installed by `make setup` (the gptq extra)")
    from rayq.host import precisions

    with pytest.raises(gptq_groups.GroupSizeError, match="group_size 128 does not divide its hidden_size 64"):
        precisions.load_model("gptq-int4", str(tiny_model), "cpu", {"group_size": 128})


def test_the_cpu_refuses_a_group_per_row_before_quantizing(tmp_path: Path) -> None:
    """Where no group of 32 divides the layers, "auto" means -1, which torch's CPU kernel cannot run
    (it failed at the first forward pass, after the quantization was paid for)."""
    pytest.importorskip("gptqmodel", reason="GPTQModel is installed by `make setup` (the gptq extra)")
    from rayq.host import precisions

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 80, "intermediate_size": 160,
                                                      "num_attention_heads": 4}))  # fmt: skip
    with pytest.raises(gptq_groups.GroupSizeError) as e:
        precisions.load_model("gptq-int4", str(tmp_path), "cpu", {})
    assert str(e.value) == (
        "group_size -1 (one group per row) on the CPU: torch's int4 kernel takes groups of 32, 64, 128, 256 only, "
        "not rows of hidden_size 80, intermediate_size 160, num_attention_heads*head_dim 80; "
        "no group size divides them all: use a GPU"
    )
    with pytest.raises(gptq_groups.GroupSizeError, match="use group_size 32 or 64 \\(or auto\\)"):
        (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
        precisions.load_model("gptq-int4", str(tmp_path), "cpu", {"group_size": -1})


def _wide_model(path: Path) -> Path:
    """The tiny model with hidden 192 and intermediate 384: like the bundled model, 128 divides neither."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_model(path)
    config = LlamaConfig.from_pretrained(path)
    config.hidden_size, config.intermediate_size = 192, 384
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_the_default_quantizes_a_576_like_model_into_ok_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gptqmodel", reason="GPTQModel is installed by `make setup` (the gptq extra)")
    from rayq.host.config import HostConfig
    from rayq.host.transformers_host import ModelHost

    monkeypatch.setenv("RAYQ_CACHE", str(tmp_path / "cache"))
    model = _wide_model(tmp_path / "wide")
    host = ModelHost(HostConfig(sweep="t", model="wide", source=f"path:{model}", precision="gptq-int4",
                                precision_options={"calibration_count": 16}))  # fmt: skip
    info = host.info()
    assert info["load_status"] == "ok", info["load_error"]
    assert info["settings"]["gptq"]["group_size"] == 64
    assert info["settings"]["gptq"]["group_size_auto"] is True
    assert info["weight_format"] == "int4 g64 (GPTQ)" and info["weight_bits"] == 4 + 20 / 64  # scale and zero per 64
    s = spec.parse(sweep_dict(model, precisions=["gptq-int4"]))
    comps = [c.to_dict() for c in planner.iter_completions(s, s.spec.models[0], "gptq-int4")][:3]
    rows = host.generate(comps)
    assert [r["status"] for r in rows] == ["ok"] * 3, [r["error"] for r in rows]
    # The same weights under another model name (the same model on another engine, say): no second quantization.
    renamed = ModelHost(HostConfig(sweep="t", model="wide-vllm", source=f"path:{model}", precision="gptq-int4",
                                   precision_options={"calibration_count": 16})).info()  # fmt: skip
    assert renamed["load_status"] == "ok" and renamed["settings"]["cache_hit"] is True
    assert renamed["settings"]["checkpoint"] == info["settings"]["checkpoint"]

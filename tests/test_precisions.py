"""The precision matrix on a tiny model: every registered precision loads, generates and is measured."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rayq.catalog import precisions
from rayq.host import precisions as host_precisions
from rayq.host.config import HostConfig
from rayq.host.transformers_host import ModelHost
from rayq.planning import planner, spec
from tests.conftest import sweep_dict

BNB = ["bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq"]


@pytest.fixture(scope="module")
def hosts(tiny_model: Path) -> dict[str, ModelHost]:
    return {
        p: ModelHost(HostConfig(sweep="t", model="tiny", source=f"path:{tiny_model}", precision=p))
        for p in ["fp32", "bf16", "fp16", *BNB]
    }


def _comps(model: Path) -> list[dict]:
    s = spec.parse(sweep_dict(model))
    return [c.to_dict() for c in planner.iter_completions(s, s.spec.models[0], "fp32")][:2]


def _mean_sqnr(host: ModelHost) -> float:
    vals = [layer["sqnr_db"] for layer in host.info()["layers"] if layer["kind"] != "other"]  # the decoder's linears
    assert vals and all(not math.isnan(v) for v in vals)
    return sum(vals) / len(vals)


def test_every_precision_loads_generates_and_is_measured(hosts: dict[str, ModelHost], tiny_model: Path) -> None:
    for name, host in hosts.items():
        info = host.info()
        assert info["load_status"] == "ok", (name, info["load_error"])
        assert "measure_error" not in info, (name, info.get("measure_error"))
        rows = host.generate(_comps(tiny_model))
        assert all(r["status"] == "ok" and r["text"] for r in rows), (name, [r["error"] for r in rows])
        assert 1 <= len(info["reference_tokens"]) <= 32 and info["reference_prompt"] == "Life in London"
        assert {layer["kind"] for layer in info["layers"]} == {"attn.attn", "att.proj", "mlp.fc", "mlp.proj", "other"}


def test_footprint_is_ordered_by_bits(hosts: dict[str, ModelHost]) -> None:
    fp = {name: h.info()["footprint_bytes"] for name, h in hosts.items()}
    assert fp["fp32"] > fp["bf16"] == fp["fp16"] > fp["bnb-int8"] > fp["bnb-nf4"]
    assert fp["bnb-nf4"] == fp["bnb-fp4"]


def test_held_bytes_count_the_quantization_scales(hosts: dict[str, ModelHost]) -> None:
    held = {name: h.info()["held_bytes"] for name, h in hosts.items()}
    fp = {name: h.info()["footprint_bytes"] for name, h in hosts.items()}
    assert held["fp32"] == fp["fp32"]  # nothing hidden in a dense model
    for q in ("nf4", "fp4"):
        # get_memory_footprint sees no difference between plain and double quantization; the scales differ.
        # (On this tiny model the nested state's tables outweigh the saving; tests/test_bundled.py checks
        # that double quantization holds fewer bytes on a real model.)
        assert fp[f"bnb-{q}-dq"] == fp[f"bnb-{q}"]
        assert held[f"bnb-{q}"] > fp[f"bnb-{q}"] and held[f"bnb-{q}-dq"] > fp[f"bnb-{q}-dq"]
        assert held[f"bnb-{q}-dq"] != held[f"bnb-{q}"]


def test_sqnr_falls_with_fewer_bits(hosts: dict[str, ModelHost]) -> None:
    assert all(math.isinf(layer["sqnr_db"]) for layer in hosts["fp32"].info()["layers"])  # fp32 is the reference itself
    s = {name: _mean_sqnr(h) for name, h in hosts.items() if name != "fp32"}
    assert s["fp16"] > s["bf16"] > s["bnb-int8"] > s["bnb-nf4"] > 5.0
    assert s["bnb-nf4"] > s["bnb-fp4"]  # nf4's levels fit normally distributed weights better


def test_settings_are_recorded_with_library_defaults(hosts: dict[str, ModelHost]) -> None:
    qc = hosts["bnb-int8"].info()["settings"]["quantization_config"]
    assert qc["load_in_8bit"] is True and qc["llm_int8_threshold"] == 6.0
    qc4 = hosts["bnb-nf4-dq"].info()["settings"]["quantization_config"]
    assert qc4["bnb_4bit_quant_type"] == "nf4" and qc4["bnb_4bit_use_double_quant"] is True
    assert qc4["bnb_4bit_compute_dtype"] == "float32"  # fp32 compute on a CPU
    assert hosts["bf16"].info()["settings"] == {"dtype": "bfloat16"}


def test_sweep_file_overrides_are_applied_recorded_and_change_ids(tiny_model: Path) -> None:
    opts = {"bnb-int8": {"llm_int8_threshold": 4.0}, "bnb-fp4": {"compute_dtype": "bfloat16"}}
    s = spec.parse(sweep_dict(tiny_model, precisions=["bnb-int8", "bnb-fp4"], precision_options=opts))
    for precision, key, value in (("bnb-int8", "llm_int8_threshold", 4.0),
                                  ("bnb-fp4", "bnb_4bit_compute_dtype", "bfloat16")):  # fmt: skip
        host = ModelHost(HostConfig(sweep="t", model="tiny", source=f"path:{tiny_model}", precision=precision,
                                    precision_options=s.spec.precision_options[precision]))  # fmt: skip
        assert host.info()["settings"]["quantization_config"][key] == value
    plain = spec.parse(sweep_dict(tiny_model, precisions=["bnb-int8", "bnb-fp4"]))
    ids = {c.completion_id for c in planner.iter_completions(s, s.spec.models[0], "bnb-int8")}
    plain_ids = {c.completion_id for c in planner.iter_completions(plain, plain.spec.models[0], "bnb-int8")}
    assert not ids & plain_ids  # another threshold is other work


def test_missing_backend_is_a_clear_error(tiny_model: Path) -> None:
    info = precisions.register(precisions.PrecisionInfo("test-missing", "dense", 2.0, ("no_such_backend_xyz",)))
    try:
        with pytest.raises(host_precisions.MissingBackendError, match=r"needs the package.*no_such_backend_xyz"):
            host_precisions.load_model(info.name, str(tiny_model), "cpu", {})
        host = ModelHost(HostConfig(sweep="t", model="tiny", source=f"path:{tiny_model}", precision=info.name))
        [row] = host.generate(_comps(tiny_model)[:1])
        assert row["status"] == "error" and "no_such_backend_xyz" in row["error"]
    finally:
        precisions.REGISTRY.pop(info.name)


def test_unknown_precision_lists_the_known_ones() -> None:
    with pytest.raises(precisions.UnknownPrecisionError, match="known precisions: fp32, bf16, fp16, bnb-int8"):
        precisions.get("int3")

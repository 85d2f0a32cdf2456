"""Quantization schemes on a real (tiny) model host: simulated weights, activations and KV
cache, transformers' fp8 QuantizedCache, and fidelity against a baseline host.

The hosts are built in-process (no Ray) from the tiny random-weight Llama of conftest;
tests/test_design_space_run.py runs schemes through `rayq run`.
"""

from __future__ import annotations

import math
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from rayq.catalog import precisions
from rayq.host import sim_quant
from rayq.host.config import HostConfig
from rayq.host.transformers_host import ModelHost
from rayq.planning import planner, spec
from tests.conftest import WORDS, rayq_cmd, sweep_dict, write_sweep

FIDELITY = {"label": "words.txt", "window": 64, "stride": 32, "max_tokens": None, "top_k": 16, "baseline": "fp32"}


@pytest.fixture(scope="module")
def text() -> str:
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(300))


def host(model: Path, precision: str, fidelity: dict[str, Any] | None = None) -> ModelHost:
    config = HostConfig(sweep="t", model="tiny", source=f"path:{model}", precision=precision, fidelity=fidelity)
    return ModelHost(config)


@pytest.fixture(scope="module")
def baseline(tiny_model: Path, text: str) -> ModelHost:
    return host(tiny_model, "fp32", {**FIDELITY, "text": text})


@pytest.fixture(scope="module")
def compare(tiny_model: Path, text: str, baseline: ModelHost) -> Any:
    """A host of `precision` measured against the baseline's distributions, as the driver makes it."""
    made: dict[str, ModelHost] = {}

    def make(precision: str) -> ModelHost:
        if precision not in made:
            made[precision] = host(tiny_model, precision, {**FIDELITY, "text": text, "reference": baseline.reference()})
        return made[precision]

    return make


def ok(h: ModelHost) -> dict[str, Any]:
    info = h.info()
    assert info["load_status"] == "ok", info["load_error"]
    assert "measure_error" not in info and "fidelity_error" not in info, info
    return info


def test_scheme_names_are_parsed_and_wrong_ones_refused_with_the_reason(tiny_model: Path) -> None:
    s = precisions.get("sim-w4g128-a8-kv4g64").scheme
    assert s is not None and (s.weights, s.weight_group, s.acts, s.kv, s.kv_group) == ("int4", 128, "int8", "int4", 64)
    assert precisions.get("bnb-nf4-kv4").scheme.base == "bnb-nf4"
    assert precisions.get("fp32-qkvfp8").scheme.kv_backend == "fp8"
    assert precisions.get("sim-wmxfp4").family == "sim" and "bitsandbytes" in precisions.get("bnb-nf4-kv4").requires
    refused = {
        "sim-w8a8": "write 'sim-w8-a8'",
        "sim-w9": "unknown format 'int9'",
        "sim-a8": "starts with the weights",
        "sim-wmxfp4g32": "fixed block of 32",
        "bnb-nf4-w4": "bnb-nf4's own",
        "sim-w4-kv4-a8": "in the order w, a, kv",
        "fp32-qkv3quanto": "quanto stores a KV cache in 2, 4 bits, not 3",
        "fp32-qkv4": "qkvfp8, qkv<2|4>quanto",
        "int3": "unknown precision 'int3'",
    }
    for name, why in refused.items():
        with pytest.raises(precisions.UnknownPrecisionError, match=why.replace("|", r"\|")):
            precisions.get(name)
    # In a sweep file: refused before anything starts, naming the entry.
    with pytest.raises(spec.SpecError, match=r"precisions.*\[1\].*sim-w8a8.*write 'sim-w8-a8'"):
        spec.parse(sweep_dict(tiny_model, precisions=["fp32", "sim-w8a8"]))
    # Options are checked as the base precision's: sim has sym and dtype.
    with pytest.raises(spec.SpecError, match="group_size"):
        spec.parse(sweep_dict(tiny_model, precisions=["sim-w4"], precision_options={"sim-w4": {"group_size": 32}}))


def test_simulated_weights_are_rounded_per_group_and_the_output_layer_kept(baseline: ModelHost, compare: Any) -> None:
    h = compare("sim-w4g32")
    info = ok(h)
    assert info["weight_format"] == "int4 g32 asym" and 4 < info["weight_bits"] < 5
    assert info["act_bits"] is None and info["kv_bits"] is None and info["kv_cache"] == "default"
    for name, w in h.engine.model.named_parameters():
        w0 = dict(baseline.engine.model.named_parameters())[name]
        if name.endswith("proj.weight"):
            assert not torch.equal(w, w0), name
            groups = w.detach().reshape(-1, 32)
            assert max(len(torch.unique(g)) for g in groups) <= 16, name  # 4 bits: at most 16 levels per group
        else:  # lm_head, embeddings and norms stay as they were
            assert torch.equal(w, w0), name
    # Coarser formats lose more: per-layer SQNR and KL order as the bits do.
    w8, w3 = ok(compare("sim-w8")), ok(compare("sim-w3g32"))

    def mean_sqnr(x: ModelHost) -> float:
        return sum(r["sqnr_db"] for r in x.info()["layers"] if r["kind"] != "other") / len(x.info()["layers"])

    assert mean_sqnr(compare("sim-w8")) > mean_sqnr(h) + 15 > mean_sqnr(compare("sim-w3g32")) + 15
    assert 0 < w8["kl_div"] < info["kl_div"] < w3["kl_div"]
    assert w8["top1_agreement"] > w3["top1_agreement"] and w3["top1_agreement"] < 1


def test_the_baseline_against_itself_and_fidelity_columns(baseline: ModelHost, compare: Any, text: str) -> None:
    first = ok(baseline)
    assert first["kl_div"] is None and first["fidelity_baseline"] == "fp32" and first["fidelity_text"] == "words.txt"
    assert first["fidelity_tokens"] == len(text.split()) - 1 and math.isfinite(first["ppl"]) and first["ppl"] > 1
    again = ok(compare("fp32"))  # the baseline precision's own host in the sweep: KL 0, agreement 1
    assert abs(again["kl_div"]) < 1e-6 and again["top1_agreement"] == 1.0
    assert again["ppl"] == pytest.approx(first["ppl"])


def test_activations_are_quantized_per_token_and_metered(compare: Any) -> None:
    a8, a4 = ok(compare("sim-w8-a8")), ok(compare("sim-w8-a4"))
    assert a8["settings"]["act_quantized_layers"] == 14  # 2 layers x 7 linears; lm_head's input is kept
    assert a8["act_bits"] == 8 and a8["kv_bits"] is None and a8["weight_format"] == "int8 per-channel asym"
    assert a8["act_sqnr_db"] > a4["act_sqnr_db"] + 15 > 15  # ~6 dB a bit
    assert ok(compare("sim-w8"))["act_sqnr_db"] is None
    assert a4["kl_div"] > a8["kl_div"] > 0


def test_a_simulated_kv_cache_quantizes_each_entry_as_it_enters(compare: Any, tiny_model: Path) -> None:
    h = compare("sim-w8-kv2")
    info = ok(h)
    assert info["kv_cache"] == "sim" and info["kv_bits"] == 2 and 0 < info["kv_sqnr_db"] < 20
    assert info["kl_div"] > ok(compare("sim-w8"))["kl_div"]
    cache = sim_quant.new_cache(h.engine.model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        h.engine.model(input_ids=ids, past_key_values=cache, use_cache=True)
    keys = cache.layers[0].keys
    assert type(cache.layers[0]).__name__.startswith("SimQuant") and keys.shape[-2] == 6
    assert max(len(torch.unique(row)) for row in keys.reshape(-1, keys.shape[-1])) <= 4  # 2 bits per token
    rows = h.generate(_completions(tiny_model, "sim-w8-kv2"))
    assert {r["status"] for r in rows} == {"ok"} and {r["kv_cache"] for r in rows} == {"sim"}


def test_transformers_fp8_cache_stores_the_entries_in_fp8(compare: Any, tiny_model: Path) -> None:
    h = compare("fp32-qkvfp8")
    info = ok(h)
    assert (info["kv_cache"], info["kv_bits"], info["weight_format"]) == ("fp8", 8, "fp32")
    assert info["kv_sqnr_db"] > 20 and info["kl_div"] > 0
    cache = sim_quant.new_cache(h.engine.model)
    from transformers import QuantizedCache

    with torch.inference_mode():
        h.engine.model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
        h.engine.model(input_ids=torch.tensor([[8]]), past_key_values=cache, use_cache=True)
    stored, _scale = cache.layers[0]._quantized_keys
    assert isinstance(cache, QuantizedCache) and stored.dtype == torch.float8_e4m3fn and stored.shape[-2] == 4
    rows = h.generate(_completions(tiny_model, "fp32-qkvfp8"))
    assert {r["status"] for r in rows} == {"ok"} and {r["kv_cache"] for r in rows} == {"fp8"}


def test_a_real_quantized_model_takes_a_simulated_kv_cache(compare: Any) -> None:
    info = ok(compare("bnb-nf4-kv4"))
    assert info["weight_format"] == "bnb-nf4 (bitsandbytes)" and info["weight_bits"] == pytest.approx(4.5, abs=0.1)
    assert info["kv_cache"] == "sim" and info["kv_bits"] == 4 and info["kv_sqnr_db"] > 0
    assert type(compare("bnb-nf4-kv4").engine.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"


def test_optimum_quanto_stores_the_cache_in_packed_4_bit(compare: Any, tiny_model: Path) -> None:
    """transformers' QuantizedCache with the quanto backend (the `kv` extra): the newest 128 tokens
    stay as they are, the rest is stored packed; fidelity sees it because its windows feed their
    context in a forward of its own (rayq.host.fidelity)."""
    h = compare("fp32-qkv4quanto")
    info = ok(h)
    assert (info["kv_cache"], info["kv_bits"], info["settings"]["kv_residual_length"]) == ("quanto", 4, 128)
    assert info["kv_sqnr_db"] > 5 and info["kl_div"] > 0
    cache = sim_quant.new_cache(h.engine.model)
    with torch.inference_mode():
        h.engine.model(input_ids=torch.arange(4, 40).unsqueeze(0), past_key_values=cache, use_cache=True)
    stored = cache.layers[0]._quantized_keys
    assert type(stored).__name__ == "WeightQBitsTensor" and stored.qtype.bits == 4
    rows = h.generate(_completions(tiny_model, "fp32-qkv4quanto"))
    assert {r["status"] for r in rows} == {"ok"} and {r["kv_cache"] for r in rows} == {"quanto"}


@pytest.mark.skipif(not precisions.missing_packages(precisions.get("fp32-qkv4hqq")), reason="hqq is installed here")
def test_a_kv_library_that_is_not_installed_is_named(tiny_model: Path, tmp_path: Path) -> None:
    info = host(tiny_model, "fp32-qkv4hqq").info()
    assert info["load_status"] == "error" and "hqq" in info["load_error"]
    path = write_sweep(tmp_path / "s.yaml", sweep_dict(tiny_model, precisions=["fp32", "fp32-qkv4hqq"]))
    out = subprocess.run([*rayq_cmd(), "plan", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr  # the preflight refuses it: its hosts run here
    assert "precision fp32-qkv4hqq needs hqq, which is not installed here" in out.stderr


def _completions(model: Path, precision: str) -> list[dict[str, Any]]:
    s = spec.parse(sweep_dict(model, precisions=[precision]))
    return [c.to_dict() for c in planner.iter_completions(s, s.spec.models[0], precision)][:2]

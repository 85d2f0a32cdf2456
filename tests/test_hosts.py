"""The host key: one (model, precision), written "model/precision" one way everywhere it is persisted."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayq.catalog import engines
from rayq.catalog.hosts import HostKey
from rayq.execution.host_pool import host_name
from rayq.planning import planner, spec
from tests.conftest import sweep_dict


@pytest.mark.parametrize(
    ("model", "precision"),
    [("tiny", "fp32"), ("llama2-7b", "bnb-nf4-dq"), ("m.v2_x", "sim-w4g128-kv4"), ("org/model#3", "gptq-int4")],
)
def test_the_text_is_model_slash_precision_and_reads_back(model: str, precision: str) -> None:
    key = HostKey(model, precision)
    assert str(key) == f"{model}/{precision}" and f"{key:>30s}" == f"{model}/{precision}".rjust(30)
    assert HostKey.parse(str(key)) == key  # a model named outside a sweep file may hold '/': read at the last one


@pytest.mark.parametrize("text", ["fp32", "m/", "/fp32", ""])
def test_a_text_that_is_not_a_key_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a host key"):
        HostKey.parse(text)


def test_a_precision_never_holds_the_separator() -> None:
    with pytest.raises(ValueError, match="no '/' in a precision"):
        HostKey("m", "a/b")


def test_the_persisted_texts_are_the_ones_written_before(tiny_model: Path) -> None:
    """Block ids, the manifest's planned counts, actor names and refusal lines keep their text."""
    sweep = spec.parse(sweep_dict(tiny_model, precisions=["fp32", "bf16"]), "t.yaml")
    groups = planner.groups(sweep)
    assert [g.key for g in groups] == ["tiny/fp32", "tiny/bf16"]
    assert [g.host for g in groups] == [HostKey("tiny", "fp32"), HostKey("tiny", "bf16")]
    bid = groups[0].block_ids[0]
    assert bid == "tiny/fp32|temperature=0.7,top_k=1"
    assert planner.split_block_id(bid) == ("tiny/fp32", "tiny", "fp32")
    assert {c.block_id.split("|")[0] for c in planner.iter_completions(sweep, groups[1].model, "bf16")} == {"tiny/bf16"}
    assert host_name(groups[0].key) == "rayq-host:tiny/fp32" and host_name(groups[0].key, 2) == "rayq-host:tiny/fp32#2"
    asked = []
    engines.refusals(sweep, lambda key: asked.append(key))  # type: ignore[func-returns-value]
    assert asked == ["tiny/fp32", "tiny/bf16"]

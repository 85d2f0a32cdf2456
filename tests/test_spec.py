"""The sweep file: good files load, bad ones are refused naming the file and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rayq.planning import planner, spec
from tests.conftest import rayq_cmd, sweep_dict, write_sweep

REPO = Path(__file__).resolve().parent.parent


def _error(tmp_path: Path, data: dict | str) -> str:
    f = tmp_path / "bad.yaml"
    if isinstance(data, str):
        f.write_text(data)
    else:
        write_sweep(f, data)
    with pytest.raises(spec.SpecError) as e:
        spec.load(f)
    msg = str(e.value)
    assert str(f) in msg, msg
    return msg


def test_shipped_sweeps_load() -> None:
    smoke = spec.load(REPO / "sweeps" / "smoke.yaml")
    assert planner.total_completions(smoke) == 80
    roy = spec.load(REPO / "sweeps" / "roy2023.yaml")
    groups = planner.groups(roy)
    assert len(roy.spec.models) == 7 and len(roy.spec.precisions) == 6
    assert {g.n_completions for g in groups} == {6300}
    # The default block: one (model, precision, temperature, top_k) cell across prompts
    # and max_new_tokens: 9 x 7 = 63 per host, 2,646 for the study.
    assert sum(len(g.block_ids) for g in groups) == 2646
    design = spec.load(REPO / "sweeps" / "design-space.yaml")
    schemes = design.spec.precisions
    assert len(schemes) >= 20 and design.spec.fidelity is not None and design.spec.fidelity_baseline == schemes[0]
    assert design.spec.models[0].bundled == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("change", "field", "why"),
    [
        ({"grid": {"temperature": [0.5, 1.0, -1.0]}}, "grid.temperature[2]", "greater than or equal to 0"),
        ({"grid": {"top_k": [0]}}, "grid.top_k[0]", "greater than or equal to 1"),
        ({"grid": {"max_new_tokens": [16, 0]}}, "grid.max_new_tokens[1]", "greater than or equal to 1"),
        ({"grid": {"top_k": []}}, "grid.top_k", "at least 1"),
        ({"grid": {"top_k": ["fifty"]}}, "grid.top_k[0]", "valid integer"),
        ({"grid": {"beams": [1]}}, "grid.beams", "unknown key"),
        ({"colour": "blue"}, "colour", "unknown key"),
        ({"precisions": ["fp32", "int3"]}, "precisions[1]", "unknown precision 'int3'"),
        ({"precisions": []}, "precisions", "at least 1"),
        ({"models": []}, "models", "at least 1"),
        ({"prompts": []}, "prompts", "at least 1"),
        ({"seeds": 0}, "seeds", "greater than or equal to 1"),
        ({"runtime": {"num_gpus": -1}}, "runtime.num_gpus", "greater than or equal to 0"),
        ({"runtime": {"block_by": ["colour"]}}, "runtime.block_by[0]", "not a grid parameter"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, tiny_model: Path, change: dict, field: str, why: str) -> None:
    data = sweep_dict(tiny_model)
    for k, v in change.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    msg = _error(tmp_path, data)
    assert f"{field}:" in msg and why in msg, msg


def test_duplicate_model_names(tmp_path: Path, tiny_model: Path) -> None:
    m = {"name": "tiny", "path": str(tiny_model)}
    msg = _error(tmp_path, sweep_dict(tiny_model, models=[m, m]))
    assert "models[1]: duplicate model name 'tiny'" in msg


def test_model_needs_exactly_one_source(tmp_path: Path, tiny_model: Path) -> None:
    msg = _error(tmp_path, sweep_dict(tiny_model, models=[{"name": "x", "path": "/a", "hub": "b/c"}]))
    assert "models[0]" in msg and "exactly one source" in msg


def test_missing_prompts_file(tmp_path: Path, tiny_model: Path) -> None:
    msg = _error(tmp_path, sweep_dict(tiny_model, prompts={"file": "nope.txt"}))
    assert "prompts.file: no such file" in msg


def test_prompts_file_relative_to_sweep(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    f = write_sweep(tmp_path / "ok.yaml", sweep_dict(tiny_model, prompts={"file": "p.txt"}))
    assert spec.load(f).prompt_texts == ("first prompt", "second prompt")


def test_unreadable_yaml(tmp_path: Path) -> None:
    msg = _error(tmp_path, "name: x\nmodels: [unclosed\n")
    assert "not valid YAML at line" in msg


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    msg = _error(tmp_path, "name: !!python/object/apply:os.system ['true']\n")
    assert "not valid YAML" in msg


def test_cli_rejects_bad_file_naming_the_field(tmp_path: Path, tiny_model: Path) -> None:
    data = sweep_dict(tiny_model)
    data["grid"]["temperature"] = [0.5, -0.1]
    f = write_sweep(tmp_path / "bad.yaml", data)
    proc = subprocess.run([*rayq_cmd(), "plan", str(f)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert str(f) in proc.stderr and "grid.temperature[1]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validation_and_plan_import_neither_torch_nor_ray() -> None:
    """What keeps `rayq plan` on a bad file well under a second: no heavy imports."""
    code = (
        "import sys; from rayq import cli; from rayq.planning import planner, spec; "
        "s = spec.load('sweeps/roy2023.yaml'); planner.groups(s); "
        "heavy = [m for m in ('torch', 'ray', 'transformers', 'polars') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_repeated_values_and_block_by_name_their_element(tmp_path: Path, tiny_model: Path) -> None:
    data = sweep_dict(tiny_model, runtime={"block_by": ["top_k", "colour"]})
    data["grid"]["top_k"] = [1, 5, 1]
    msg = _error(tmp_path, data)
    assert "grid.top_k[2]: 1 is listed twice" in msg
    assert "runtime.block_by[1]: 'colour' is not a grid parameter" in msg


def test_model_path_must_hold_a_model_and_is_relative_to_the_file(tmp_path: Path, tiny_model: Path) -> None:
    msg = _error(tmp_path, sweep_dict(tiny_model, models=[{"name": "x", "path": "no-such-dir"}]))
    assert "models[0].path" in msg and "no config.json" in msg
    (tmp_path / "sub").mkdir()
    f = write_sweep(tmp_path / "sub" / "ok.yaml", sweep_dict(tiny_model, models=[{"name": "x", "path": "../m"}]))
    (tmp_path / "m").symlink_to(tiny_model)
    assert spec.load(f).spec.models[0].path == str(tiny_model.resolve())


def test_model_name_must_not_look_like_a_number(tmp_path: Path, tiny_model: Path) -> None:
    msg = _error(tmp_path, sweep_dict(tiny_model, models=[{"name": "70", "path": str(tiny_model)}]))
    assert "models[0].name" in msg and "looks like a number" in msg


def test_the_fidelity_block_is_checked_before_anything_starts(tmp_path: Path, tiny_model: Path) -> None:
    precisions = ["fp32", "sim-w4g128"]
    msg = _error(tmp_path, sweep_dict(tiny_model, precisions=precisions, fidelity={"baseline": "bf16"}))
    assert "fidelity.baseline" in msg and "'bf16' is not one of this sweep's precisions (fp32, sim-w4g128)" in msg
    msg = _error(tmp_path, sweep_dict(tiny_model, precisions=precisions, fidelity={"window": 512, "stride": 512}))
    assert "fidelity" in msg and "stride 512 must be smaller than window 512" in msg
    msg = _error(tmp_path, sweep_dict(tiny_model, precisions=precisions, fidelity={"text": "missing.txt"}))
    assert "fidelity.text: no such file" in msg and str(tmp_path / "missing.txt") in msg
    msg = _error(tmp_path, sweep_dict(tiny_model, precisions=precisions, fidelity={"top_k": 0}))
    assert "fidelity.top_k" in msg
    (tmp_path / "eval.txt").write_text("some words to score")
    f = write_sweep(tmp_path / "ok.yaml", sweep_dict(tiny_model, precisions=precisions, fidelity={"text": "eval.txt"}))
    s = spec.load(f)
    assert s.spec.fidelity is not None and s.spec.fidelity.text == str(tmp_path / "eval.txt")
    assert s.spec.fidelity_baseline == "fp32" and s.spec.fidelity.window == 1024 and s.spec.fidelity.top_k == 64

"""rayq as a library: rayq.sweep / plan / run on real sweeps, one real run on the tiny model,
`rayq.plan` and `rayq.run` as plain functions, the progress bar on a
real pseudo-terminal, and the code of docs/library.md."""

from __future__ import annotations

import ast
import io
import os
import pickle
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import rayq
from rayq.execution.progress import Progress
from rayq.planning.spec import SpecError, Sweep
from tests.conftest import sweep_dict, write_sweep

REPO = Path(__file__).resolve().parent.parent
BUNDLED = {"name": "smollm2-135m", "bundled": "smollm2-135m-instruct"}


def bundled_fields(**overrides: Any) -> dict[str, Any]:
    """A sweep on the bundled model: validating it reads no weights, so it suits spec-only tests."""
    fields: dict[str, Any] = {
        "name": "lib",
        "models": [BUNDLED],
        "precisions": ["fp32", "bf16"],
        "prompts": ["Life in London", "Hello, my name is"],
        "grid": {"max_new_tokens": [8, 16], "temperature": [0.7, 1.0]},
        "seeds": 2,
        "runtime": {"block_by": ["temperature"]},
    }
    return {**fields, **overrides}


# -- rayq.sweep -----------------------------------------------------------------------


def test_sweep_from_keywords_or_a_dict_is_the_sweep_a_file_gives(tmp_path: Path) -> None:
    fields = bundled_fields()
    from_keywords = rayq.sweep(**fields)
    assert isinstance(from_keywords, Sweep)
    assert rayq.sweep(fields) == from_keywords
    # keywords win over the dict's keys; the kept text is YAML that reads back to the fields
    assert rayq.sweep(fields, precisions=["fp16"]).spec.precisions == ["fp16"]
    import yaml

    assert yaml.safe_load(from_keywords.text) == fields
    from_file = rayq.planning.spec.load(write_sweep(tmp_path / "lib.yaml", fields))
    assert from_file.spec == from_keywords.spec and from_file.prompt_texts == from_keywords.prompt_texts


def test_sweep_takes_paths_and_tuples_as_yaml_would_and_relative_paths_from_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "prompts.txt").write_text("Life in London\nHello, my name is\n")
    monkeypatch.chdir(tmp_path)
    s = rayq.sweep(bundled_fields(prompts={"file": Path("prompts.txt")}, precisions=("fp32",)))
    assert s.prompt_texts == ("Life in London", "Hello, my name is")
    assert s.spec.precisions == ["fp32"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"grid": {"temperature": [0.7, -1]}}, "grid.temperature[1]"),
        ({"precisions": ["fp32", "int3"]}, "precisions[1]"),
        ({"modles": []}, "modles"),
        ({"grid": {"temperature": [0.7, object()]}}, "grid.temperature[1]"),
    ],
)
def test_a_bad_sweep_is_a_spec_error_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        rayq.sweep(**bundled_fields(**overrides))
    assert isinstance(err.value, rayq.RayqError)
    message = str(err.value)
    assert message.startswith("<rayq.sweep>: ") and f"{field}: " in message, message


# -- rayq.plan ------------------------------------------------------------------------


def test_plan_is_the_same_from_a_dict_a_sweep_and_a_file(tmp_path: Path) -> None:
    fields = bundled_fields()
    path = write_sweep(tmp_path / "lib.yaml", fields)
    plans = [rayq.plan(fields), rayq.plan(rayq.sweep(fields)), rayq.plan(path), rayq.plan(str(path))]
    assert all(p == plans[0] for p in plans)
    p = plans[0]
    # 2 prompts x 2 seeds x 2 max_new_tokens x 2 temperatures, per precision; blocks by temperature
    assert (p.sweep, p.completions, p.blocks, p.done, p.remaining, p.output) == ("lib", 32, 4, 0, 32, None)
    assert [(h.key, h.model, h.precision, h.completions, h.blocks, h.done) for h in p.hosts] == [
        ("smollm2-135m/fp32", "smollm2-135m", "fp32", 16, 2, 0),
        ("smollm2-135m/bf16", "smollm2-135m", "bf16", 16, 2, 0),
    ]
    assert str(p).splitlines() == [
        "sweep 'lib': 32 completions in 4 blocks on 2 model hosts",
        "  smollm2-135m/fp32  bundled:smollm2-135m-instruct  16 completions in 2 blocks",
        "  smollm2-135m/bf16  bundled:smollm2-135m-instruct  16 completions in 2 blocks",
    ]
    # an output that does not exist yet counts nothing, and is not created
    assert rayq.plan(fields, output=tmp_path / "none").output is None and not (tmp_path / "none").exists()
    with pytest.raises(SpecError, match="cannot read the sweep file"):
        rayq.plan(tmp_path / "missing.yaml")


@pytest.fixture(scope="module")
def ray_shut_down_after() -> Iterator[None]:
    """rayq.run starts a private Ray in this process and leaves it up (a notebook reuses it);
    the next test module starts its own."""
    yield
    import ray

    ray.shutdown()


def test_run_then_plan_shows_all_done_and_a_second_run_writes_nothing(
    tmp_path: Path, tiny_model: Path, ray_shut_down_after: None
) -> None:
    import polars as pl

    fields = sweep_dict(
        tiny_model,
        name="lib",
        prompts=["Life in London", "Hello, my name is"],
        grid={"max_new_tokens": [4], "temperature": [1.0], "top_k": [1, 50]},
    )
    out = tmp_path / "out"
    before = rayq.plan(fields, output=out)
    assert (before.completions, before.blocks, before.done, before.output) == (4, 2, 0, None)

    result = rayq.run(fields, out, quiet=True)
    assert isinstance(result, rayq.execution.driver.RunResult)
    assert result.complete and result.written == result.planned == 4 and not result.errors

    after = rayq.plan(fields, output=out)
    assert (after.done, after.remaining, after.output) == (4, 0, str(out))
    assert [(h.key, h.done, h.remaining) for h in after.hosts] == [("tiny/fp32", 4, 0)]
    assert str(after).splitlines()[-1] == f"4 done in {out}, 0 remaining"

    files = sorted((p.relative_to(out), p.stat().st_size) for p in (out / "completions").rglob("*.parquet"))
    again = rayq.run(rayq.sweep(fields), str(out), quiet=True)
    assert again.complete and again.written == 0 and again.done_before == 4
    assert sorted((p.relative_to(out), p.stat().st_size) for p in (out / "completions").rglob("*.parquet")) == files

    df = rayq.open(out).completions.collect()
    by_top_k = df.group_by("top_k").agg(pl.len().alias("rows")).sort("top_k")
    assert by_top_k.rows() == [(1, 2), (50, 2)]


# -- the package: cheap to import; rayq.plan / rayq.run are plain functions ------------------

PLAN_CALL = (
    "p = rayq.plan({'name': 'x', 'models': [{'name': 'm', 'bundled': 'smollm2-135m-instruct'}], "
    "'precisions': ['fp32'], 'prompts': ['a', 'b']}); assert p.completions == 2, p; "
)


def python(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_import_rayq_and_plan_import_no_torch_ray_or_polars() -> None:
    heavy = "[m for m in ('torch', 'ray', 'polars') if m in sys.modules]"
    python(f"import sys, rayq; assert not {heavy}, {heavy}; {PLAN_CALL}assert not {heavy}, {heavy}")


def test_plan_and_run_are_plain_functions_beside_the_modules_they_call() -> None:
    python(
        "import rayq, types; from rayq.planning import planner; from rayq.execution.driver import run_sweep; "
        f"{PLAN_CALL}"
        "assert isinstance(rayq.plan, types.FunctionType) and isinstance(rayq.run, types.FunctionType); "
        "import pickle; assert pickle.loads(pickle.dumps(rayq.plan)) is rayq.plan"
    )


# -- progress: a live bar on a terminal, plain lines in a log ----------------------------


@contextmanager
def pseudo_terminal(columns: int) -> Iterator[tuple[io.TextIOWrapper, int]]:
    """A real pseudo-terminal `columns` wide (0: one that does not say, as `script` opens):
    (a text stream on its slave end, its master fd)."""
    import fcntl
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns, 0, 0))
    stream = io.TextIOWrapper(io.FileIO(slave, "w"), encoding="utf-8", write_through=True)
    try:
        yield stream, master
    finally:
        stream.close()
        os.close(master)


@pytest.fixture
def terminal() -> Iterator[tuple[io.TextIOWrapper, int]]:
    with pseudo_terminal(100) as t:
        yield t


def read_terminal(master: int) -> str:
    os.set_blocking(master, False)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_progress_on_a_terminal_is_a_live_bar_with_the_note(terminal: tuple[io.TextIOWrapper, int]) -> None:
    stream, master = terminal
    progress = Progress(40, done_before=10, stream=stream, every_s=0)
    assert progress.tty
    progress.note = "hosts: 1 loading"
    progress.tick()  # nothing written yet: the bar still shows, with the note
    progress.add(5)
    progress.note = "hosts: 1 ready; " + "tiny/bf16 waits for 1 GPU " * 5  # longer than the terminal
    progress.tick()
    copy = pickle.loads(pickle.dumps(progress))  # as Tune pickles it: without the bar, which stays live here
    assert copy._bar is None and copy.done == 15
    progress.add(25)
    progress.close()
    shown = read_terminal(master)
    draws = [d for d in re.split(r"[\r\n]+", shown) if d]
    assert draws[0].startswith("rayq: 10/40 completions  25%|") and draws[0].endswith("| ?/s | ETA ?, hosts: 1 loading")
    assert re.fullmatch(r"rayq: 15/40 completions  38%\|.{20}\| +[\d.]+/s \| ETA \d\d:\d\d, hosts: 1 loading", draws[1])
    # cut one short of the width, not wrapped: a wrapped line cannot be redrawn in place
    assert "hosts: 1 ready; " in draws[2] and len(draws[2]) == 99 and all(len(d) <= 99 for d in draws)
    assert draws[-1].startswith("rayq: 40/40 completions 100%|") and shown.endswith("\n")
    assert "\r" in shown  # redrawn in place


def test_progress_on_a_terminal_that_gives_no_size_still_draws_80_columns() -> None:
    with pseudo_terminal(0) as (stream, master):
        progress = Progress(40, stream=stream, every_s=0)
        progress.note = "hosts: 1 ready; " + "tiny/bf16 waits for 1 GPU " * 5
        progress.add(10)
        progress.close()
        draws = [d for d in re.split(r"[\r\n]+", read_terminal(master)) if d]
    assert draws and all(d.startswith("rayq: ") and len(d) == 79 for d in draws), draws


def test_progress_in_a_log_is_plain_lines_at_most_every_10_s() -> None:
    log = io.StringIO()
    progress = Progress(40, done_before=10, stream=log, every_s=0)
    assert not progress.tty and progress.every_s == 10.0
    progress.note = "hosts: 1 ready"
    progress.add(5)  # the first line is due at once
    progress.tick()  # within 10 s: nothing
    progress.add(5)
    progress.add(20)  # the last completion always shows
    progress.close()
    lines = log.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in log.getvalue()
    assert len(lines) == 3, lines
    assert re.fullmatch(r"rayq: 15/40 completions \(37\.5%\) \| [\d.]+/s \| ETA \S+ \| hosts: 1 ready", lines[0])
    assert re.fullmatch(r"rayq: 40/40 completions \(100\.0%\) \| [\d.]+/s \| ETA 0s \| hosts: 1 ready", lines[1])


# -- docs/library.md ------------------------------------------------------------------


def test_the_code_cells_of_docs_library_md_compile() -> None:
    text = (REPO / "docs" / "library.md").read_text()
    cells = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(cells) >= 6
    for cell in cells:
        ast.parse(cell)
    code = "\n".join(cells)
    for call in ("rayq.sweep(", "rayq.plan(", "rayq.run(", "rayq.open(", "except rayq.RayqError", "group_by("):
        assert call in code, call
    assert '"bundled": "smollm2-135m-instruct"' in code


def test_plan_refuses_a_prompt_past_the_context_as_rayq_plan_does(tiny_model: Path) -> None:
    from rayq.planning.context import ContextError

    data = sweep_dict(tiny_model, prompts=[" ".join(["london"] * 700)], grid={"max_new_tokens": [8]})
    refused = r"prompt 0 \(70\d tokens\) \+ max_new_tokens 8 = 7\d\d > its context of 512"
    with pytest.raises(ContextError, match=refused):
        rayq.plan(data)
    assert rayq.plan(data, allow_past_context=True).completions == 1


def test_a_quiet_progress_counts_but_draws_nothing() -> None:
    stream = io.StringIO()
    progress = Progress(10, 2, stream=stream, quiet=True)
    progress.add(8)
    progress.tick()
    progress.close()
    assert progress.done == 10 and stream.getvalue() == ""

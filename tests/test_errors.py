"""Refusals a user can cause are RayqErrors (one `rayq:` line, a documented exit status), and every
exit status is named once, in rayq.errors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rayq import errors
from rayq.errors import EXIT_INCOMPLETE, EXIT_REFUSED, RayqError

ROOT = Path(__file__).resolve().parent.parent / "rayq"


def _raises(call, old_base: type[BaseException]) -> RayqError:  # type: ignore[no-untyped-def]
    with pytest.raises(RayqError) as info:
        call()
    assert isinstance(info.value, old_base), f"{type(info.value).__name__} is no longer a {old_base.__name__}"
    return info.value


def test_the_catalogs_refusals_are_rayq_errors_and_keep_their_old_base() -> None:
    from rayq.catalog import engines, precisions, schemes

    assert "unknown precision 'int3'" in str(_raises(lambda: precisions.get("int3"), KeyError))
    _raises(lambda: precisions.get("sim-w9"), KeyError)
    _raises(lambda: schemes.parse("sim-w4-w4", {"fp32"}), ValueError)
    assert "known engines: transformers" in str(_raises(lambda: engines.get("tgi"), ValueError))


def test_sizes_gpu_types_and_an_empty_fidelity_text_are_rayq_errors(tmp_path: Path) -> None:
    from rayq.catalog import fidelity_text
    from rayq.planning import estimate, throughput

    _raises(lambda: estimate.parse_bytes("80XB"), ValueError)
    _raises(lambda: estimate.parse_count("lots"), ValueError)
    _raises(lambda: throughput.gpu_type("a9000"), ValueError)
    (tmp_path / "empty.txt").write_text("  \n")
    _raises(lambda: fidelity_text.read_text(tmp_path / "empty.txt"), ValueError)


def test_the_store_and_reports_refusals_are_rayq_errors(tmp_path: Path) -> None:
    from rayq.report import build
    from rayq.store.dataset import StaleWriterError, Store
    from rayq.store.query import query
    from tests.test_store import row

    assert _raises(lambda: query(tmp_path / "none", "SELECT 1"), FileNotFoundError).exit_status == EXIT_REFUSED
    store = Store(tmp_path / "out")
    store.write("m", "fp32", [row("a")])
    _raises(lambda: query(tmp_path / "out", "SELEC nothing"), ValueError)
    (tmp_path / "empty" / "completions").mkdir(parents=True)
    assert "no completions to report on" in str(_raises(lambda: build(tmp_path / "empty"), ValueError))
    old = store.take_ownership()
    Store(tmp_path / "out").take_ownership(force=True)
    stale = _raises(lambda: store.write("m", "fp32", [row("b")], old), RuntimeError)
    assert isinstance(stale, StaleWriterError) and stale.exit_status == EXIT_INCOMPLETE


def test_no_command_or_run_result_spells_an_exit_status_as_a_number() -> None:
    """Every status a command returns is one of rayq.errors' EXIT_* names (docs/cli.md lists them)."""
    names = {n for n in dir(errors) if n.startswith("EXIT_")}
    bad = []
    for path in [*sorted((ROOT / "cli").glob("*.py")), ROOT / "execution" / "driver.py", ROOT / "__main__.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if path.name == "driver.py":  # RunResult.exit_status; the driver's other numbers are counts
            tree = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "exit_status")
        for node in ast.walk(tree):
            value = node.value if isinstance(node, ast.Return) else None
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "exit", "SystemExit"):
                value = node.args[0] if node.args else None
            if isinstance(value, ast.Constant) and isinstance(value.value, int) and not isinstance(value.value, bool):
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert bad == [] and {"EXIT_OK", "EXIT_REFUSED", "EXIT_INCOMPLETE"} <= names

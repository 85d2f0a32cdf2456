"""The command line: `rayq plan`, `rayq run`, `rayq status`, `rayq check`, `rayq query`, `rayq report`.

One module per command (`rayq/cli/<command>.py`), imported by name only when that command
runs: `rayq plan`, `status`, `check`, `query` and `report` never import torch, Ray or vLLM
(tests/test_architecture.py reads the imports), so a bad sweep file is refused in well under a
second. This module parses the flags and turns every refusal into one `rayq:` line and a
documented exit status.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from rayq.cli.common import ALLOW_PAST_CONTEXT_HELP, ALLOW_SWEEP_CHANGE_HELP, QUERY_FORMATS, first_line
from rayq.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, RayqError

COMMANDS = ("plan", "run", "status", "check", "query", "report")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayq", description="Sweeps over quantized LLMs on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("plan", help="validate a sweep file and show its work; starts nothing")
    pl.add_argument("file")
    pl.add_argument("--output", help="results directory (to show what is already done)")
    pl.add_argument("--gpus", type=int, help="place the hosts on a cluster of this many GPUs per node")
    pl.add_argument("--gpu-memory", help="memory of one GPU of that cluster, e.g. 80GB (GB means GiB)")
    pl.add_argument("--nodes", type=int, default=1, help="nodes of that cluster (default 1)")
    pl.add_argument("--address", help="place the hosts on this live Ray cluster instead (e.g. auto)")
    pl.add_argument(
        "--gpu-type",
        help="the GPUs' type for speed predictions, e.g. h100-80gb (default: the sweep's runtime.gpu_type, "
        "what a live cluster reports, else a100-80gb, the paper's)",
    )
    pl.add_argument("--allow-past-context", action="store_true", help=ALLOW_PAST_CONTEXT_HELP)
    pl.add_argument("--allow-sweep-change", action="store_true", help=ALLOW_SWEEP_CHANGE_HELP)

    r = sub.add_parser("run", help="run (or resume) a sweep")
    r.add_argument("file")
    r.add_argument("--output", help="results directory (default: the sweep file's `output`)")
    r.add_argument("--address", help="Ray address to join (e.g. auto, ray://host:10001); default: start a local Ray")
    r.add_argument("--retry-failed", action="store_true", help="run again the completions recorded as failed")
    r.add_argument("--force", action="store_true", help="take over a results directory another run claims")
    r.add_argument("--allow-past-context", action="store_true", help=ALLOW_PAST_CONTEXT_HELP)
    r.add_argument("--allow-sweep-change", action="store_true", help=ALLOW_SWEEP_CHANGE_HELP)

    s = sub.add_parser("status", help="done / total per model and precision")
    s.add_argument("dir", help="results directory, or an object-storage URI such as s3://bucket/dir")

    c = sub.add_parser(
        "check", help="read every file of a results directory; report unreadable files, missing and duplicated ids"
    )
    c.add_argument("dir", help="results directory, or an object-storage URI such as s3://bucket/dir")
    c.add_argument("--sweep", help="the sweep file to check the ids against (default: the one in the manifest)")

    q = sub.add_parser("query", help="run SQL over a results directory (tables: completions, models, layers)")
    q.add_argument("dir", help="results directory, or an object-storage URI such as s3://bucket/dir")
    q.add_argument("sql", help='one SQL statement, e.g. "SELECT model, count(*) FROM completions GROUP BY model"')
    q.add_argument("--format", choices=QUERY_FORMATS, default="table", help="output format (default: table)")
    q.add_argument("--out", help="write the result to this file instead of stdout (required for parquet)")

    rp = sub.add_parser("report", help="write an HTML report (and a Markdown twin) of a results directory")
    rp.add_argument("dir", help="results directory, or an object-storage URI such as s3://bucket/dir")
    rp.add_argument("--out", help="the HTML file to write (default: DIR/report.html; required for a URI)")
    rp.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per interval (default 1000)")
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    """rayq's own warnings as one `rayq: warning:` line; everyone else's as Python prints them."""
    from rayq.store.dataset import DamagedFileWarning

    if issubclass(category, DamagedFileWarning):
        print(f"rayq: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Run one command; every refusal and failure ends as one `rayq:` line and a documented exit status.

    A traceback is for bugs only, and then only with RAYQ_DEBUG=1 (docs/cli.md lists the statuses).
    """
    args = _parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        command = importlib.import_module(f"rayq.cli.{args.command}")  # by name: only this command's imports
        return command.cmd(args)
    except RayqError as e:
        print(f"rayq: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("rayq: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `rayq status DIR | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:  # a disk full, a permission denied, a Ray address nobody answers at
        if os.environ.get("RAYQ_DEBUG"):
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"rayq: {e.strerror or first_line(e)}{where}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # a bug still ends as one line; RAYQ_DEBUG=1 shows where
        if os.environ.get("RAYQ_DEBUG"):
            raise
        print(
            f"rayq: internal error: {type(e).__name__}: {first_line(e)} "
            "(a bug in rayq: please report it; RAYQ_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL

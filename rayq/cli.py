"""The command line: `rayq plan`, `rayq run`, `rayq status`, `rayq check`, `rayq query`, `rayq report`.

Heavy imports (ray, torch, polars) happen inside the commands that need them, so a bad
sweep file is rejected in well under a second.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from rayq.errors import EXIT_CHECK_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, RayqError
from rayq.spec import SpecError

if TYPE_CHECKING:
    import polars as pl

    from rayq.spec import Sweep

QUERY_FORMATS = ("table", "csv", "json", "parquet")
TABLE_ROWS = 50  # rows `--format table` prints; the other formats write them all
TABLE_COLS = 12
ALLOW_PAST_CONTEXT_HELP = (
    "run prompts + max_new_tokens past a model's context length, with a warning "
    "(default: refuse; the same as runtime.allow_past_context: true)"
)


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

    r = sub.add_parser("run", help="run (or resume) a sweep")
    r.add_argument("file")
    r.add_argument("--output", help="results directory (default: the sweep file's `output`)")
    r.add_argument("--address", help="Ray address to join (e.g. auto, ray://host:10001); default: start a local Ray")
    r.add_argument("--retry-failed", action="store_true", help="run again the completions recorded as failed")
    r.add_argument("--force", action="store_true", help="take over a results directory another run claims")
    r.add_argument("--allow-past-context", action="store_true", help=ALLOW_PAST_CONTEXT_HELP)
    r.add_argument(
        "--allow-sweep-change",
        action="store_true",
        help="run a sweep into a directory holding another sweep, or rows this sweep does not plan (kept beside it)",
    )

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


def cmd_plan(args: argparse.Namespace) -> int:
    from rayq import planner, spec
    from rayq.precisions import get, gptq, missing_packages

    sweep = spec.load(args.file)
    placement_lines = _placement_lines(sweep, args)  # bad cluster flags fail before anything prints
    context_lines = _context_lines(sweep, args.allow_past_context)  # so does a prompt past the context
    gptq.check_sweep(sweep)  # and a GPTQ group size that does not divide a model's layers
    rt = sweep.spec.runtime
    groups = planner.groups(sweep)
    total = sum(g.n_completions for g in groups)
    grid = planner.grid_values(sweep)
    n_blocks = sum(len(g.block_ids) for g in groups)
    print(f"sweep {sweep.spec.name!r} ({args.file})")
    print(f"  prompts: {len(sweep.prompt_texts)}; seeds: {len(sweep.spec.seed_values)}")
    for k, v in grid.items():
        print(f"  grid.{k}: {v}")
    print(f"  completions: {total} ({len(groups)} model hosts x {total // max(1, len(groups))})")
    print(
        f"  blocks (Tune trials): {n_blocks}, by {', '.join(rt.block_by) or 'nothing'}; "
        f"{total // max(1, n_blocks)} completions each"
    )
    gpus = rt.num_gpus if rt.num_gpus == "auto" else f"{rt.num_gpus:g}"
    print(f"  each host actor: num_cpus={rt.num_cpus:g}, num_gpus={gpus}, batch_size={rt.batch_size}")
    for line in _decode_lines(sweep):
        print(line)
    if (fid := sweep.spec.fidelity) is not None:
        print(
            f"  fidelity: each host on {Path(fid.text).name if fid.text else 'rayq/fidelity.txt'} "
            f"(window {fid.window}, stride {fid.stride}, {fid.max_tokens or 'all'} tokens); "
            f"KL and top-1 agreement against {sweep.spec.fidelity_baseline} (top {fid.top_k})"
        )
    done: dict[str, int] = {}
    out = args.output or sweep.spec.output
    if out and Path(out, "completions").is_dir():
        from rayq.store import Store

        for (m, p), counts in Store(out).status_counts().items():
            done[f"{m}/{p}"] = sum(counts.values())
    print("  model hosts:")
    for g in groups:
        info = get(g.precision)
        d = done.get(g.key, 0)
        print(
            f"    {g.key:40s} {g.model.source:40s} {info.bytes_per_param:g} B/param  "
            f"{g.n_completions} completions" + (f", {d} done" if out else "")
        )
    for name in sweep.spec.precisions:
        missing = missing_packages(get(name))
        if missing:  # the run would record every completion of these hosts as failed
            print(f"  warning: precision {name} needs {', '.join(missing)}, which is not installed here")
        if name in sweep.spec.precision_options:
            print(f"  precision_options.{name}: {sweep.spec.precision_options[name]}")
    for line in context_lines:
        print(line)
    for line in placement_lines:
        print(line)
    print("nothing started (rayq run FILE to run)")
    return 0


def _decode_lines(sweep: Sweep) -> list[str]:
    """How each host decodes its completions, and the work that saves against the paper's protocol."""
    from rayq import planner

    rt = sweep.spec.runtime
    w = planner.decode_work(sweep)
    engines = sorted({sweep.spec.engine_of(m) for m in sweep.spec.models})
    parts = [f"{w.serial} serial" + (f" (timing sample: {rt.serial_sample} per grid cell)" if rt.serial_sample else "")]
    if w.batched:
        parts.append(f"{w.batched} batched")
    if w.shared:
        parts.append(f"{w.shared} copy a greedy output decoded once (shares_output_of)")
    lines = [f"  decoding, each host ({', '.join(engines)}): {w.total} completions: {', '.join(parts)}"]
    if w.batched or w.shared:
        lines.append(
            f"  saved against the paper's protocol (every completion its own generate call): "
            f"{w.total - w.serial} of {w.total} completions per host not decoded one at a time, "
            f"{w.shared} not decoded at all"
        )
    return lines


def _context_lines(sweep: Sweep, allow: bool) -> list[str]:
    """Whether each model's prompts + max_new_tokens fit its context; raises ContextError when refused."""
    from rayq import context

    checks = context.check_models(sweep)
    overflows = context.require_fit(sweep, allow, checks)
    lines = context.plan_lines(checks)
    if overflows:
        lines.append(
            f"  warning: context: {context.describe_overflows(overflows)} "
            "(allowed; the rows that run past it will have past_context true)"
        )
    return lines


def _placement_lines(sweep: Sweep, args: argparse.Namespace) -> list[str]:
    from rayq import engines, placement, throughput

    rt = sweep.spec.runtime
    if args.gpu_type is not None and args.gpu_type not in throughput.GPU_TYPES:
        raise SpecError(f"--gpu-type: unknown GPU type {args.gpu_type!r}; known: {', '.join(throughput.GPU_TYPES)}")
    if args.gpus is not None:
        if args.gpus < 0 or args.nodes < 1:
            raise SpecError("--gpus must be >= 0 and --nodes >= 1")
        memory = args.gpu_memory or rt.gpu_memory
        if args.gpus and not memory:
            raise SpecError("--gpus needs --gpu-memory (or runtime.gpu_memory in the sweep file), e.g. 80GB")
        try:
            cluster = placement.named_cluster(args.gpus, memory, args.nodes)
        except ValueError as e:
            raise SpecError(f"--gpu-memory: {e}") from None
    elif args.address:
        from rayq.driver import start_ray

        start_ray(args.address)
        cluster = placement.live_cluster(args.gpu_memory or rt.gpu_memory)
    else:
        lines = ["  placement: add --gpus N --gpu-memory SIZE [--nodes M], or --address auto for a live cluster"]
        if rt.num_gpus == 0:  # CPU hosts whatever the cluster: what an engine lacks on a CPU is refused now
            refused = engines.refusals(sweep, lambda _key: "cpu")
            if refused:
                raise SpecError("refused before launch (runtime.num_gpus 0: CPU hosts):\n  " + "\n  ".join(refused))
        return lines
    out = args.output or sweep.spec.output
    measured, tokens, note = {}, None, []
    if out and _has_results(out):  # price what is left, at the rates earlier runs measured
        from rayq import planner
        from rayq.store import Store

        measured = throughput.measured_rates(out)
        work = planner.remaining_work(sweep, Store(out).finished_ids())
        tokens = work.tokens
        note = [f"  cost of what is left in {out}: {work.planned - work.done_before} of {work.planned} completions"]
    placed = placement.plan_placement(sweep, cluster, gpu=args.gpu_type, measured=measured, tokens=tokens)
    refused = engines.refusals(sweep, engines.placed_devices(placed))
    if refused:
        raise SpecError("refused before launch, an engine cannot run these hosts where they are placed:\n  "
                        + "\n  ".join(refused))
    return note + placement.describe(placed)


def _has_results(out: str) -> bool:
    from rayq.storage import is_remote

    return not is_remote(out) and Path(out, "completions").is_dir()


def cmd_run(args: argparse.Namespace) -> int:
    from rayq import spec
    from rayq.driver import run_sweep, summary_lines

    sweep = spec.load(args.file)
    result = run_sweep(
        sweep,
        args.output,
        args.address,
        retry_failed=args.retry_failed,
        force=args.force,
        allow_past_context=args.allow_past_context,
        allow_sweep_change=args.allow_sweep_change,
    )
    for line in summary_lines(result):
        print(line)
    return result.exit_status


def cmd_status(args: argparse.Namespace) -> int:
    from rayq import live_status, manifest
    from rayq.store import Store

    try:
        store = Store(args.dir)
        if not store.exists():
            print(f"rayq: {args.dir}: no such results directory", file=sys.stderr)
            return 2
        m = manifest.load(store.storage)
        counts = store.status_counts()
    except (OSError, ValueError) as e:  # an unreachable bucket, missing keys, a URI pyarrow cannot parse
        print(f"rayq: cannot read {args.dir}: {_first_line(e)}", file=sys.stderr)
        return 2
    planned: dict[str, int] = m.get("planned", {})
    keys = sorted(set(planned) | {f"{a}/{b}" for a, b in counts})
    print(f"{'model/precision':40s} {'done':>8s} {'total':>8s} {'ok':>8s} {'failed':>8s}")
    tot_done = tot_planned = 0
    for key in keys:
        c = counts.get(tuple(key.split("/", 1)), {})  # type: ignore[call-overload]
        n = sum(c.values())
        ok = c.get("ok", 0)
        total = planned.get(key, 0)
        tot_done += n
        tot_planned += total
        print(f"{key:40s} {n:8d} {total:8d} {ok:8d} {n - ok:8d}")
    print(f"{'all':40s} {tot_done:8d} {tot_planned:8d}")
    runs = m.get("runs", [])
    if runs:
        last = runs[-1]
        state = (
            "running or killed" if "ended_at" not in last else ("complete" if last.get("complete") else "incomplete")
        )
        print(f"last run: {last.get('started_at')} ({state}); {len(runs)} run(s) in all")
        status = live_status.read(store.storage)
        if status and status.get("run_id") == last.get("run_id"):
            for line in live_status.describe(status, live="ended_at" not in last):
                print(line)
    return 0


def _missing_results_dir(path: str) -> bool:
    """Whether `path` is a local results directory that is not there (said on stderr).

    Object storage has no directory to look for: a wrong prefix reads as empty, or fails
    when read, with its own message.
    """
    from rayq.storage import Storage, is_remote

    if is_remote(path) or Storage.at(path).exists():
        return False
    print(f"rayq: {path}: no such results directory", file=sys.stderr)
    return True


def cmd_query(args: argparse.Namespace) -> int:
    import polars as pl

    from rayq.query import QueryError, query

    if args.format == "parquet" and not args.out:
        print("rayq: --format parquet needs --out FILE", file=sys.stderr)
        return 2
    if _missing_results_dir(args.dir):
        return 2
    try:
        df = query(args.dir, args.sql)
    except QueryError as e:
        print(f"rayq: {e}", file=sys.stderr)
        return 2
    except (OSError, pl.exceptions.PolarsError) as e:  # an unreadable file, an unreachable bucket
        print(f"rayq: cannot read {args.dir}: {_first_line(e)}", file=sys.stderr)
        return 2
    try:
        if args.format == "table":
            text = _table_text(df)
            if args.out:
                Path(args.out).write_text(text + "\n")
            else:
                print(text)
        elif args.format == "csv" and args.out:
            df.write_csv(args.out)
        elif args.format == "csv":
            sys.stdout.write(df.write_csv())
        elif args.format == "json" and args.out:
            df.write_json(args.out)
        elif args.format == "json":
            print(df.write_json())
        else:
            df.write_parquet(args.out)
    except BrokenPipeError:  # `rayq query ... | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, pl.exceptions.PolarsError) as e:  # e.g. nested values have no CSV form
        print(f"rayq: cannot write {args.format}: {_first_line(e)}", file=sys.stderr)
        return 2
    if args.out:
        print(f"rayq: {df.height} rows written to {args.out}", file=sys.stderr)
    return 0


def _table_text(df: pl.DataFrame) -> str:
    """At most TABLE_ROWS x TABLE_COLS, then a line with the full size, so a big result never floods a terminal."""
    import shutil

    import polars as pl

    width = max(shutil.get_terminal_size((120, 24)).columns, 100)
    with pl.Config(
        tbl_rows=TABLE_ROWS,
        tbl_cols=TABLE_COLS,
        tbl_hide_dataframe_shape=True,
        fmt_str_lengths=40,
        tbl_width_chars=width,
    ):
        text = str(df.head(TABLE_ROWS))
    foot = f"{df.height:,} row{'s' if df.height != 1 else ''}"
    if df.height > TABLE_ROWS:
        foot += f" (first {TABLE_ROWS} shown; --format csv or json for all)"
    if df.width > TABLE_COLS:
        foot += f"; {df.width} columns ({TABLE_COLS} shown)"
    return f"{text}\n{foot}"


def cmd_report(args: argparse.Namespace) -> int:
    import polars as pl

    from rayq.report import write
    from rayq.storage import is_uri

    if is_uri(args.dir) and not args.out:
        print(f"rayq: {args.dir}: a report is written to local files only; pass --out FILE.html", file=sys.stderr)
        return 2
    if _missing_results_dir(args.dir):
        return 2
    try:
        html_path, md_path = write(args.dir, args.out, n_boot=args.bootstrap)
    except ValueError as e:
        print(f"rayq: {_first_line(e)}", file=sys.stderr)
        return 2
    except (OSError, pl.exceptions.PolarsError) as e:  # an unreadable file, an unreachable bucket
        print(f"rayq: cannot read {args.dir}: {_first_line(e)}", file=sys.stderr)
        return 2
    print(f"rayq: report written to {html_path} (and {md_path})")
    return 0


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def cmd_check(args: argparse.Namespace) -> int:
    from rayq.check import check_dataset

    report = check_dataset(args.dir, args.sweep)
    for line in report.lines():
        print(line)
    return EXIT_OK if report.clean else EXIT_CHECK_FAILED


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    """rayq's own warnings as one `rayq: warning:` line; everyone else's as Python prints them."""
    from rayq.store import DamagedFileWarning

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
        commands = {
            "plan": cmd_plan,
            "run": cmd_run,
            "status": cmd_status,
            "check": cmd_check,
            "query": cmd_query,
            "report": cmd_report,
        }
        return commands[args.command](args)
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
        print(f"rayq: {e.strerror or _first_line(e)}{where}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # a bug still ends as one line; RAYQ_DEBUG=1 shows where
        if os.environ.get("RAYQ_DEBUG"):
            raise
        print(
            f"rayq: internal error: {type(e).__name__}: {_first_line(e)} "
            "(a bug in rayq: please report it; RAYQ_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

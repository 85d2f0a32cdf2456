"""`rayq run`: run or resume a sweep (the only command that starts Ray and loads models)."""

from __future__ import annotations

import argparse


def cmd(args: argparse.Namespace) -> int:
    from rayq.execution.driver import run_sweep, summary_lines
    from rayq.planning import spec

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

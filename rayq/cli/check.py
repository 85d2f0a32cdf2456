"""`rayq check`: every byte of every file read, ids compared with the plan."""

from __future__ import annotations

import argparse

from rayq.errors import EXIT_CHECK_FAILED, EXIT_OK


def cmd(args: argparse.Namespace) -> int:
    from rayq.store.check import check_dataset

    report = check_dataset(args.dir, args.sweep)
    for line in report.lines():
        print(line)
    return EXIT_OK if report.clean else EXIT_CHECK_FAILED

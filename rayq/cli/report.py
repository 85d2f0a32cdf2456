"""`rayq report`: the HTML report and its Markdown twin."""

from __future__ import annotations

import argparse
import sys

from rayq.cli.common import cannot_read, first_line, missing_results_dir
from rayq.errors import EXIT_OK, EXIT_REFUSED


def cmd(args: argparse.Namespace) -> int:
    import polars as pl

    from rayq.report import write
    from rayq.store.storage import is_uri

    if is_uri(args.dir) and not args.out:
        print(f"rayq: {args.dir}: a report is written to local files only; pass --out FILE.html", file=sys.stderr)
        return EXIT_REFUSED
    if missing_results_dir(args.dir):
        return EXIT_REFUSED
    try:
        html_path, md_path = write(args.dir, args.out, n_boot=args.bootstrap)
    except ValueError as e:
        print(f"rayq: {first_line(e)}", file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, pl.exceptions.PolarsError) as e:  # an unreadable file, an unreachable bucket
        return cannot_read(args.dir, e)
    print(f"rayq: report written to {html_path} (and {md_path})")
    return EXIT_OK

"""`rayq query`: SQL over a results directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rayq.cli.common import TABLE_COLS, TABLE_ROWS, cannot_read, first_line, missing_results_dir
from rayq.errors import EXIT_OK, EXIT_REFUSED

if TYPE_CHECKING:
    import polars as pl


def cmd(args: argparse.Namespace) -> int:
    import polars as pl

    from rayq.store.query import QueryError, query

    if args.format == "parquet" and not args.out:
        print("rayq: --format parquet needs --out FILE", file=sys.stderr)
        return EXIT_REFUSED
    if missing_results_dir(args.dir):
        return EXIT_REFUSED
    try:
        df = query(args.dir, args.sql)
    except QueryError as e:
        print(f"rayq: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, pl.exceptions.PolarsError) as e:  # an unreadable file, an unreachable bucket
        return cannot_read(args.dir, e)
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
        return EXIT_OK
    except (OSError, pl.exceptions.PolarsError) as e:  # e.g. nested values have no CSV form
        print(f"rayq: cannot write {args.format}: {first_line(e)}", file=sys.stderr)
        return EXIT_REFUSED
    if args.out:
        print(f"rayq: {df.height} rows written to {args.out}", file=sys.stderr)
    return EXIT_OK


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

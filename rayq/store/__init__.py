"""store: the results directory. What is on disk, and what is done.

Holds where the bytes live (a directory or s3://), the Parquet dataset and its schema (atomic
writes, compaction, the ownership fence), the manifest and the sweep history, queries, `rayq
check`, the live status file, and the one preflight every entry point calls (preflight.py: the
planning layer's checks of the sweep, then the results directory's).
May import: catalog, planning (a plan says which ids should be there) and errors; pyarrow and
Polars. Never torch, Ray or vLLM: a results directory is read anywhere.
"""

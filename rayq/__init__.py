"""rayq: large-scale sweeps over quantized LLMs on Ray, into a resumable Parquet dataset."""

__version__ = "0.1.0"

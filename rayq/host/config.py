"""What it takes to start a model host, as one validated value: the contract's other half.

Torch-free, so that the execution layer (the driver, the host pool, the baseline) can build
and send it without importing an engine.
"""

from __future__ import annotations


def torch_threads(num_cpus: float) -> int:
    """torch's thread count for a host holding `num_cpus` CPUs.

    More threads than cores made torch 10-40x slower on this 2-core machine, so a host
    uses exactly its CPU share (at least one thread).
    """
    return max(1, int(num_cpus))

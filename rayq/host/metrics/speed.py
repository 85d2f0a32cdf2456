"""Generation speed as the paper reports it: generated tokens over wall time."""

from __future__ import annotations

from rayq.host.metrics.registry import Finished, register


@register("speed")
def speed(done: Finished) -> dict[str, float]:
    return {"tokens_per_s": done.n_new_tokens / done.latency_s if done.latency_s > 0 else 0.0}

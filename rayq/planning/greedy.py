"""Is a row greedy, and which greedy rows share one output: decided here, once.

Read by the planner (how many rows `runtime.share_greedy` saves, `rayq plan`) and by every
host and decoder (which rows copy another's output into `shares_output_of`, and which rows
draw tokens at random), so the plan's count and the dataset agree. Plain Python: the host
imports it inside its actor, `rayq plan` on a laptop.

Two questions, one built on the other:
- `samples(params)`: does the decoder draw tokens (do_sample and temperature > 0)? Otherwise it
  takes the argmax and leaves temperature, top_k and top_p out (transformers refuses to sample
  at temperature 0; vLLM's greedy is temperature 0).
- `is_greedy(params)`: is the output the argmax path? Also true of a row that samples with
  top_k 1, since drawing from one token is taking it.

A greedy output depends, within one host, on the prompt's text, max_new_tokens and the
repetition penalty only (`greedy_key`). The key holds the prompt's *text*, not its index: the
text is what the model reads (and what `completion_id` hashes), so two indices with one text
would share an output, as they should; a sweep file refuses a prompt listed twice
(rayq.planning.spec), so within one sweep the two keys group the same rows and the
`shares_output_of` values written before this module are the ones it gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def samples(params: Mapping[str, Any]) -> bool:
    """Whether the decoder draws this row's tokens at random: do_sample true and temperature > 0."""
    return bool(params["do_sample"]) and params["temperature"] > 0


def is_greedy(params: Mapping[str, Any]) -> bool:
    """Whether the output is the argmax path: it does not sample, or samples from top_k 1."""
    return not samples(params) or int(params["top_k"]) == 1


def greedy_key(row: Mapping[str, Any]) -> tuple[str, int, float] | None:
    """What a greedy row's output depends on within one host; None for a row that decodes its own.

    `row` is a completion as a host receives it (rayq.planning.planner.Completion.to_dict():
    `prompt`, `params`, `protocol`), or the flat mapping of a dataset row. A sampled row has
    None, and so has a row of the serial timing sample (protocol "serial"): it is timed on its own.
    """
    p = row["params"] if "params" in row else row
    if row.get("protocol") == "serial" or not is_greedy(p):
        return None
    return (row["prompt"], int(p["max_new_tokens"]), float(p["repetition_penalty"]))

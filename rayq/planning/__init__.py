"""planning: from a sweep file to the work it means, before anything starts.

Holds the sweep file's schema, the planner (completions with stable ids, blocks), the
context check, memory estimates, the throughput model, placement, the pure scheduler and the
preflight's checks of a sweep on this machine (rayq.store.preflight adds the results directory's).
May import: catalog and errors; pydantic and PyYAML; transformers only where a tokenizer or a
config is read (rayq.planning.context). Never torch, Ray or vLLM: `rayq plan` answers in a
second on a laptop.
"""

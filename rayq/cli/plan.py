"""`rayq plan`: validate a sweep file and show its work; starts nothing, imports neither torch nor Ray."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rayq.catalog import engines
from rayq.catalog.precisions import get
from rayq.errors import EXIT_OK
from rayq.planning.spec import SpecError

if TYPE_CHECKING:
    from rayq.planning.preflight import DeviceOf
    from rayq.planning.spec import Sweep
    from rayq.store.preflight import Preflight


def cmd(args: argparse.Namespace) -> int:
    from rayq.planning import planner, spec
    from rayq.store.preflight import preflight

    sweep = spec.load(args.file)
    device_of, placement_lines = _placement(sweep, args)  # bad cluster flags fail before anything prints
    pre = preflight(  # the one preflight `rayq run` makes: what it refuses is refused here, before anything prints
        sweep,
        args.output or sweep.spec.output,
        allow_past_context=args.allow_past_context,
        allow_sweep_change=args.allow_sweep_change,
        address=args.address,
        device_of=device_of,
    )
    context_lines = _context_lines(pre)
    rt = sweep.spec.runtime
    groups = planner.groups(sweep)
    total = sum(g.n_completions for g in groups)
    grid = planner.grid_values(sweep)
    n_blocks = sum(len(g.block_ids) for g in groups)
    print(f"sweep {sweep.spec.name!r} ({args.file})")
    print(f"  prompts: {len(sweep.prompt_texts)}; seeds: {len(sweep.spec.seed_values)}")
    for k, v in grid.items():
        print(f"  grid.{k}: {v}")
    print(f"  completions: {total} ({len(groups)} model hosts x {total // max(1, len(groups))})")
    print(
        f"  blocks (Tune trials): {n_blocks}, by {', '.join(rt.block_by) or 'nothing'}; "
        f"{total // max(1, n_blocks)} completions each"
    )
    gpus = rt.num_gpus if rt.num_gpus == "auto" else f"{rt.num_gpus:g}"
    print(f"  each host actor: num_cpus={rt.num_cpus:g}, num_gpus={gpus}, batch_size={rt.batch_size}")
    for line in _decode_lines(sweep):
        print(line)
    if (fid := sweep.spec.fidelity) is not None:
        print(
            f"  fidelity: each host on {Path(fid.text).name if fid.text else 'rayq/fidelity.txt'} "
            f"(window {fid.window}, stride {fid.stride}, {fid.max_tokens or 'all'} tokens); "
            f"KL and top-1 agreement against {sweep.spec.fidelity_baseline} (top {fid.top_k})"
        )
    done: dict[str, int] = {}
    out = args.output or sweep.spec.output
    if out:
        from rayq.store.dataset import Store
        from rayq.store.done import done_per_host

        store = Store(out)  # a directory or s3://, counted as resume counts (rayq.store.done)
        if store.exists():
            done = done_per_host(sweep, store)
    print("  model hosts:")
    for g in groups:
        info = get(g.precision)
        d = done.get(g.key, 0)
        print(
            f"    {g.key:40s} {g.model.source:40s} {info.bytes_per_param:g} B/param  "
            f"{g.n_completions} completions" + (f", {d} done" if out else "")
        )
    for warning in pre.warnings:  # packages missing here, for hosts that run on a cluster
        print(f"  warning: {warning} (the cluster's workers may have it)")
    for name in sweep.spec.precisions:
        if name in sweep.spec.precision_options:
            print(f"  precision_options.{name}: {sweep.spec.precision_options[name]}")
    for line in context_lines:
        print(line)
    for line in placement_lines:
        print(line)
    print("nothing started (rayq run FILE to run)")
    return EXIT_OK


def _decode_lines(sweep: Sweep) -> list[str]:
    """How each host decodes its completions, and the work that saves against the paper's protocol."""
    from rayq.planning import planner

    rt = sweep.spec.runtime
    w = planner.decode_work(sweep)
    engines = sorted({sweep.spec.engine_of(m) for m in sweep.spec.models})
    parts = [f"{w.serial} serial" + (f" (timing sample: {rt.serial_sample} per grid cell)" if rt.serial_sample else "")]
    if w.batched:
        parts.append(f"{w.batched} batched")
    if w.shared:
        parts.append(f"{w.shared} copy a greedy output decoded once (shares_output_of)")
    lines = [f"  decoding, each host ({', '.join(engines)}): {w.total} completions: {', '.join(parts)}"]
    if w.batched or w.shared:
        lines.append(
            f"  saved against the paper's protocol (every completion its own generate call): "
            f"{w.total - w.serial} of {w.total} completions per host not decoded one at a time, "
            f"{w.shared} not decoded at all"
        )
    return lines


def _context_lines(pre: Preflight) -> list[str]:
    """Whether each model's prompts + max_new_tokens fit its context (the preflight refused what did not)."""
    from rayq.planning import context

    lines = context.plan_lines(pre.checks.checks)
    if pre.overflows:
        lines.append(
            f"  warning: context: {context.describe_overflows(pre.overflows)} "
            "(allowed; the rows that run past it will have past_context true)"
        )
    return lines


def _placement(sweep: Sweep, args: argparse.Namespace) -> tuple[DeviceOf | None, list[str]]:
    """The hosts' devices on the cluster the flags name (None: no cluster named), and the placement's lines."""
    from rayq.planning import placement, throughput

    rt = sweep.spec.runtime
    if args.gpu_type is not None and args.gpu_type not in throughput.GPU_TYPES:
        raise SpecError(f"--gpu-type: unknown GPU type {args.gpu_type!r}; known: {', '.join(throughput.GPU_TYPES)}")
    if args.gpus is not None:
        if args.gpus < 0 or args.nodes < 1:
            raise SpecError("--gpus must be >= 0 and --nodes >= 1")
        memory = args.gpu_memory or rt.gpu_memory
        if args.gpus and not memory:
            raise SpecError("--gpus needs --gpu-memory (or runtime.gpu_memory in the sweep file), e.g. 80GB")
        try:
            cluster = placement.named_cluster(args.gpus, memory, args.nodes)
        except ValueError as e:
            raise SpecError(f"--gpu-memory: {e}") from None
    elif args.address:
        from rayq.execution.cluster import live_cluster, start_ray

        start_ray(args.address)
        cluster = live_cluster(args.gpu_memory or rt.gpu_memory)
    else:
        return None, ["  placement: add --gpus N --gpu-memory SIZE [--nodes M], or --address auto for a live cluster"]
    out = args.output or sweep.spec.output
    measured, tokens, note = {}, None, []
    if out and _has_results(out):  # price what is left, at the rates earlier runs measured
        from rayq.store.dataset import Store
        from rayq.store.done import remaining_work
        from rayq.store.rates import measured_rates

        measured = measured_rates(out)
        work = remaining_work(sweep, Store(out))
        tokens = work.tokens
        note = [f"  cost of what is left in {out}: {work.planned - work.done_before} of {work.planned} completions"]
    placed = placement.plan_placement(sweep, cluster, gpu=args.gpu_type, measured=measured, tokens=tokens)
    return engines.placed_devices(placed), note + placement.describe(placed)


def _has_results(out: str) -> bool:
    from rayq.store.storage import is_remote

    return not is_remote(out) and Path(out, "completions").is_dir()

"""The fidelity baseline of each model: its distributions on the evaluation text, computed
once before the hosts start and kept in DIR/_fidelity/, so every host of that model can
measure its KL divergence and top-1 agreement against it (rayq.host.fidelity).

Why a phase of its own rather than the baseline host: hosts run in whatever order the
cluster allows, and a host must never wait for another (on one GPU that would deadlock).
So a short-lived host in the baseline precision loads the model, measures, and goes; it
costs one extra load per model, once: a resumed or extended sweep reads the file back.
The file's name is a hash of everything the distributions depend on, so a changed text,
window, baseline or model gets a new reference instead of a stale one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from rayq.catalog import engines
from rayq.catalog.fidelity_text import read_text
from rayq.catalog.hosts import HostKey
from rayq.host.config import HostConfig, torch_threads
from rayq.host.protocol import HostClass
from rayq.planning.spec import Sweep

FOLDER = "_fidelity"  # hidden from the dataset's readers, like _quarantine
# The engine of a baseline host, whatever the model's: rayq's own loop reads the logits a
# reference holds (vLLM's kernels measure no fidelity, rayq.host.vllm_host).
BASELINE_ENGINE = "transformers"


def settings(sweep: Sweep) -> dict[str, Any] | None:
    """What every host of the sweep gets for its fidelity measurement (None: not measured)."""
    spec = sweep.spec
    if spec.fidelity is None:
        return None
    text, label = read_text(spec.fidelity.text)
    f = spec.fidelity
    return {
        "text": text,
        "label": label,
        "window": f.window,
        "stride": f.stride,
        "max_tokens": f.max_tokens,
        "top_k": f.top_k,
        "baseline": spec.fidelity_baseline,
    }


def key(sweep: Sweep, model_name: str, cfg: dict[str, Any]) -> str:
    model = next(m for m in sweep.spec.models if m.name == model_name)
    baseline = cfg["baseline"]
    blob = {
        "source": model.source,
        "revision": model.revision,
        "precision": baseline,
        "options": sweep.spec.precision_options.get(baseline) or {},
        "text": hashlib.sha256(cfg["text"].encode()).hexdigest(),
        **{k: cfg[k] for k in ("window", "stride", "max_tokens", "top_k")},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def references(
    sweep: Sweep,
    cfg: dict[str, Any],
    store: Any,
    fence: Any,
    models: list[str],
    placed: Any,
    host_config: Callable[[str, Any, dict[str, Any]], HostConfig],
    host_class: HostClass | None,
    quiet: bool,
) -> dict[str, dict[str, Any]]:
    """model name -> {"reference": bytes or None, "reference_error": why it is missing}.

    `cfg` is `settings(sweep)`; `host_config(key, request, fidelity)` is the driver's
    configuration of a host; `host_class` a benchmark's stand-in (None: BASELINE_ENGINE's host).
    """
    out: dict[str, dict[str, Any]] = {}
    where = placed.by_key()
    for name in models:
        path = store.storage.path(FOLDER, f"model={name}", f"{key(sweep, name, cfg)}.npz")
        data = store.storage.read_bytes(path)
        if data is not None:
            out[name] = {"reference": data}
            continue
        group = str(HostKey(name, cfg["baseline"]))
        p = where.get(group)
        if p is None or p.unplaceable:
            why = p.request.unplaceable if p is not None else "not placed"
            out[name] = {"reference": None, "reference_error": f"no baseline reference: {group} is unplaceable ({why})"}
            continue
        if not quiet:
            print(f"rayq: measuring the fidelity baseline {group} on the evaluation text", flush=True)
        t0 = time.monotonic()
        timeout = sweep.spec.runtime.stall_timeout_s
        data, error = _measure(group, p.request, host_config(group, p.request, cfg), host_class, timeout)
        if data is not None:
            store.storage.write_bytes(path, data, check=lambda: store._check_fence(fence))
            out[name] = {"reference": data}
            if not quiet:
                print(f"rayq: baseline {group} measured in {time.monotonic() - t0:.1f} s", flush=True)
        else:
            out[name] = {"reference": None, "reference_error": f"no baseline reference: {error}"}
            if not quiet:
                print(f"rayq: warning: {out[name]['reference_error']}", flush=True)
    return out


def _measure(
    group: str, request: Any, config: HostConfig, host_class: HostClass | None, timeout: float
) -> tuple[bytes | None, str | None]:
    """Run a baseline host just long enough to measure; (its reference, or None and why).

    Bounded by the sweep's stall timeout: a baseline that never gets its resources (or hangs
    loading) costs the sweep its KL columns, never the sweep itself.
    """
    import ray

    from rayq.execution.host_pool import host_options

    anywhere = SimpleNamespace(node=SimpleNamespace(node_id=None))
    options, pg = host_options(request, anywhere, 0)  # type: ignore[arg-type]
    threads = str(torch_threads(request.num_cpus or 1))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    cls = host_class or engines.host_class(BASELINE_ENGINE)  # imported by its path, where the actor starts
    actor = ray.remote(cls).options(runtime_env={"env_vars": env}, **options).remote(config)
    try:
        data = ray.get(actor.reference.remote(), timeout=timeout)
        if data is None:
            info = ray.get(actor.info.remote(), timeout=60)
            return None, info.get("load_error") or info.get("fidelity_error") or f"{group} measured nothing"
        return data, None
    except Exception as e:  # noqa: BLE001 - the sweep goes on; its hosts record why there is no KL
        return None, f"{group}: {type(e).__name__}: {e}"
    finally:
        ray.kill(actor)
        if pg is not None:
            from ray.util import remove_placement_group

            remove_placement_group(pg)

"""GPTQ through GPTQModel: quantize once into the cache, even with two actors racing for it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from rayq.planning import planner, spec
from tests.conftest import sweep_dict

pytest.importorskip("gptqmodel", reason="GPTQModel is installed by `make setup` (the gptq extra)")


@pytest.fixture(scope="module")
def ray_two_cpus() -> Iterator[None]:
    import ray

    from rayq.execution.driver import start_ray

    start_ray(None)
    yield
    ray.shutdown()


def test_two_racing_actors_quantize_once_and_share_the_cache(
    tiny_model: Path, tmp_path: Path, ray_two_cpus: None
) -> None:
    import ray

    from rayq.host.config import HostConfig
    from rayq.host.transformers_host import ModelHost

    cache = tmp_path / "cache"
    opts = {"group_size": 64, "calibration_count": 16}  # hidden 64: the CPU kernels need group | in_features
    host_cls = ray.remote(ModelHost).options(
        num_cpus=1, runtime_env={"env_vars": {"RAYQ_CACHE": str(cache), "OMP_NUM_THREADS": "1"}}
    )
    config = HostConfig(sweep="t", model="tiny", source=f"path:{tiny_model}", precision="gptq-int4",
                        precision_options=opts)  # fmt: skip
    hosts = [host_cls.remote(config) for _ in range(2)]
    infos = ray.get([h.info.remote() for h in hosts], timeout=900)
    for info in infos:
        assert info["load_status"] == "ok", info["load_error"]
        assert info.get("measure_error") is None, info["measure_error"]
    hits = sorted(info["settings"]["cache_hit"] for info in infos)
    assert hits == [False, True]  # one quantized, the other waited on the lock and loaded its result
    paid = next(info for info in infos if not info["settings"]["cache_hit"])
    assert paid["quantize_s"] > 0 and paid["quantize_peak_mb"] > 0
    assert len({info["settings"]["checkpoint"] for info in infos}) == 1
    assert len(list((cache / "gptq").iterdir())) == 1  # no half-written siblings left behind
    assert paid["settings"]["gptq"] == {"bits": 4, "group_size": 64, "desc_act": False, "sym": True,
                                         "calibration_count": 16}  # fmt: skip

    s = spec.parse(sweep_dict(tiny_model, precisions=["gptq-int4"], precision_options={"gptq-int4": opts}))
    comps = [c.to_dict() for c in planner.iter_completions(s, s.spec.models[0], "gptq-int4")][:3]
    rows = ray.get(hosts[1].generate.remote(comps))
    assert all(r["status"] == "ok" and r["text"] for r in rows), [r["error"] for r in rows]

    layers = ray.get(hosts[0].info.remote())["layers"]
    quantized = [la for la in layers if la["kind"] != "other"]
    assert len(quantized) == 14  # 2 decoder layers x 7 linears
    assert all(la["quant_error"] is not None and la["quant_error"] >= 0 for la in quantized)
    assert all(10 < la["sqnr_db"] < 30 and math.isfinite(la["sqnr_db"]) for la in quantized)  # ~6 dB/bit
    for h in hosts:
        ray.kill(h)


def test_group_size_must_be_one_the_kernels_take(tiny_model: Path, tmp_path: Path) -> None:
    bad = sweep_dict(tiny_model, precisions=["gptq-int4"], precision_options={"gptq-int4": {"group_size": 100}})
    with pytest.raises(spec.SpecError, match=r"precision_options.gptq-int4.group_size: must be one of auto, -1, 32"):
        spec.parse(bad, "bad.yaml")

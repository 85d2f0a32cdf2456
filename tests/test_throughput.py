"""Predicted speed and cost before launch: the three sources of a rate, and `rayq plan`'s totals (no Ray)."""

from __future__ import annotations

import csv
import statistics
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import yaml

from rayq.planning import estimate, placement, spec, throughput
from rayq.store.dataset import Store
from rayq.store.rates import measured_rates
from tests.conftest import rayq_cmd

ROOT = Path(__file__).resolve().parent.parent
ROY = ROOT / "sweeps" / "roy2023.yaml"


def _roy(paper: bool = True) -> spec.Sweep:
    """roy2023.yaml; `paper`: under the paper's protocol (every completion serial), which Table 7 times."""
    sweep = spec.load(ROY)
    if not paper:
        return sweep
    data = yaml.safe_load(sweep.text)
    data["runtime"] |= {"protocol": "serial", "batch_size": 1, "serial_sample": 0, "share_greedy": False}
    return spec.parse(data, str(ROY), ROY.parent, sweep.text)


def test_paper_rates_where_model_and_precision_match_else_the_estimate() -> None:
    sweep = _roy()
    models = {m.name: m for m in sweep.spec.models}
    shape = estimate.shape_of(models["llama2-7b"])
    r = throughput.rate(models["llama2-7b"], shape, "bf16", "serial", 1, "a100-80gb")
    assert r.source == "paper" and r.tokens_per_s == pytest.approx((28.39 + 36.35) / 2)
    # Not in Table 7 (it did not load on one GPU): the bandwidth estimate.
    big = throughput.rate(
        models["llama2-70b"], estimate.shape_of(models["llama2-70b"]), "bf16", "serial", 1, "a100-80gb"
    )
    assert big.source == "estimate" and 4 < big.tokens_per_s < 12
    # Same model under another name but the same hub id: still the paper's row.
    renamed = models["llama2-7b"].model_copy(update={"name": "my-llama"})
    assert throughput.rate(renamed, shape, "bf16", "serial", 1, "a100-80gb").source == "paper"
    # A local model named like a paper model is not the paper's model.
    local = models["llama2-7b"].model_copy(update={"hub": None, "path": "/somewhere"})
    assert throughput.rate(local, shape, "bf16", "serial", 1, "a100-80gb").source == "estimate"
    unknown = throughput.rate(local, None, "bf16", "serial", 1, "a100-80gb")
    assert unknown.source == "default" and unknown.tokens_per_s == throughput.UNKNOWN_RATE


def test_the_estimate_is_calibrated_on_table_7() -> None:
    """The step model's estimate against every Table 7 row: the median ratio within 10%, 38 of 41 rows
    within 1.5x, all within 3x (the worst: redpajama-3b in int8, whose Table 7 rate is an outlier)."""
    sweep = _roy()
    models = {m.name: m for m in sweep.spec.models}
    text = resources.files("rayq.catalog").joinpath("roy2023/tokens_per_sec.csv").read_text()
    ratios = []
    for row in csv.DictReader(text.splitlines()):
        m = models[row["model"]].model_copy(update={"hub": None, "path": "/elsewhere"})  # hide the paper row
        precision = {"bfloat16": "bf16"}.get(row["quant"], row["quant"].replace(".", "-"))
        est = throughput.rate(m, estimate.shape_of(models[row["model"]]), precision, "serial", 1, "a100-80gb")
        assert est.source == "estimate"
        ratios.append(est.tokens_per_s / ((float(row["min_tok_s"]) + float(row["max_tok_s"])) / 2))
    assert len(ratios) == 41
    assert 0.9 < statistics.median(ratios) < 1.1, ratios
    assert sum(1 / 1.5 < r < 1.5 for r in ratios) >= 38, ratios
    assert all(1 / 3 < r < 3 for r in ratios), ratios


def test_faster_gpus_and_batches_are_faster_where_bandwidth_binds() -> None:
    sweep = _roy()
    m = next(x for x in sweep.spec.models if x.name == "llama2-13b")
    shape = estimate.shape_of(m)
    a100 = throughput.rate(m, shape, "bf16", "serial", 1, "a100-80gb").tokens_per_s
    h100 = throughput.rate(m, shape, "bf16", "serial", 1, "h100-80gb")
    l4 = throughput.rate(m, shape, "bf16", "serial", 1, "l4").tokens_per_s
    assert h100.source == "paper" and "carried to h100-80gb" in h100.note
    assert l4 < a100 < h100.tokens_per_s < 2 * a100  # a fixed per-step overhead caps the gain
    batched = throughput.rate(m, shape, "bf16", "batched", 32, "a100-80gb").tokens_per_s
    assert batched > 10 * a100


def test_measured_rates_from_earlier_runs_win(tmp_path: Path) -> None:
    sweep = _roy()
    store = Store(tmp_path / "out")
    info = {
        "model": "llama2-7b",
        "precision": "bf16",
        "device": "cuda:0 (NVIDIA H100 80GB HBM3)",
        "protocol": "serial",
        "generated_tokens": 30_000,
        "generate_s": 500.0,
    }
    store.write_model_info("roy2023", info)
    store.write_model_info("roy2023", {**info, "generated_tokens": 10_000, "generate_s": 300.0})
    measured = measured_rates(str(tmp_path / "out"))
    assert measured == {("llama2-7b", "bf16", "serial", "h100-80gb"): pytest.approx(40_000 / 800)}
    m = next(x for x in sweep.spec.models if x.name == "llama2-7b")
    got = throughput.rate(m, estimate.shape_of(m), "bf16", "serial", 1, "h100-80gb", measured)
    assert got.source == "measured" and got.tokens_per_s == pytest.approx(50.0)
    # On another GPU type the measurement does not apply.
    assert throughput.rate(m, estimate.shape_of(m), "bf16", "serial", 1, "a100-80gb", measured).source == "paper"
    assert measured_rates(str(tmp_path / "nothing-here")) == {}


def test_gpu_names_as_drivers_report_them() -> None:
    assert throughput.gpu_type_of_device("cuda:0 (NVIDIA A100-SXM4-80GB)") == "a100-80gb"
    assert throughput.gpu_type_of_device("cuda:0 (NVIDIA A100-SXM4-40GB)") == "a100-40gb"
    assert throughput.gpu_type_of_device("cuda:0 (NVIDIA H100 PCIe)") == "h100-pcie"
    assert throughput.gpu_type_of_device("cuda:0 (NVIDIA H100 80GB HBM3)") == "h100-80gb"
    assert throughput.gpu_type_of_device("NVIDIA L4") == "l4"
    assert throughput.gpu_type_of_device("cpu") == "cpu"
    assert throughput.gpu_type_of_device("cuda:0 (Some Future GPU)") is None


def test_the_plan_prices_the_study_per_host_and_in_total() -> None:
    sweep = _roy()
    one = placement.plan_placement(sweep, placement.named_cluster(8, "80GB"))
    two = placement.plan_placement(sweep, placement.named_cluster(8, "80GB", nodes=2))
    assert sum(p.tokens for p in one.placements) == 42 * 6300 * 275  # every completion at its max_new_tokens
    gpu_h = sum(p.gpu_seconds for p in one.scheduled) / 3600
    assert 1700 < gpu_h < 2000
    # As the file runs it: one serial completion per grid cell (10%) at the paper's rates, the
    # rest batched, and the greedy top_k 1 cells decoded once per prompt and length.
    fast = placement.plan_placement(_roy(paper=False), placement.named_cluster(8, "80GB"))
    fast_h = sum(p.gpu_seconds for p in fast.scheduled) / 3600
    assert gpu_h / 10 < fast_h < gpu_h / 4, (fast_h, gpu_h)
    # The sharded 70B hosts count two GPUs.
    int8 = one.by_key()["llama2-70b/bnb-int8"]
    assert int8.gpu_seconds == pytest.approx(2 * int8.predicted_s)
    # The schedule: never shorter than its bound, within 5% of it on these shapes.
    for p in (one, two):
        assert p.lower_bound_s <= p.makespan_s <= 1.05 * p.lower_bound_s
    assert two.makespan_s < one.makespan_s
    # Longest first: the longest host starts at once.
    longest = max(one.scheduled, key=lambda p: p.predicted_s)
    assert longest.start_s == 0


def plan_roy_on(gpu_type: str) -> subprocess.CompletedProcess[str]:
    """`rayq plan` of the Roy sweep on one 8 x 80 GB node of the named GPU type, as a user types it."""
    args = ["plan", str(ROY), "--gpus", "8", "--gpu-memory", "80GB", "--gpu-type", gpu_type]
    return subprocess.run([*rayq_cmd(), *args], capture_output=True, text=True, cwd=ROOT, check=False)


def test_plan_cli_prices_another_gpu_type_and_refuses_an_unknown_one() -> None:
    good = plan_roy_on("h100-80gb")
    assert good.returncode == 0, good.stderr
    total = next(line for line in good.stdout.splitlines() if line.strip().startswith("total:"))
    assert "GPU-hours on h100-80gb" in total and "predicted wall time" in total
    bad = plan_roy_on("h1000")
    assert bad.returncode == 2 and "unknown GPU type 'h1000'" in bad.stderr and not bad.stdout

"""The cluster files under cluster/ (docs/cluster.md), checked without starting anything.

The `ray up` config is validated the way `ray up` validates it (Ray's own schema); the KubeRay
manifests are read as Kubernetes would read them; every Ray version named in cluster/ and
docs/cluster.md must be the `ray==` pin of constraints.txt; no secret is written in any file.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
AWS = CLUSTER / "aws-gpu.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
RAYCLUSTER = CLUSTER / "kuberay-raycluster.yaml"
SCRIPT = CLUSTER / "bare-metal.sh"
SECRET_NAMES = ("RAY_AUTH_TOKEN", "HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def ray_pin() -> str:
    pins = re.findall(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert len(pins) == 1, "constraints.txt must pin ray exactly once"
    return pins[0]


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


# ---- ray up (AWS)


def test_aws_config_passes_rays_own_validation() -> None:
    """What `ray up` does before it launches anything: fill in the AWS defaults, then the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(AWS)))


def test_ray_validation_would_catch_a_typo() -> None:
    """The check above has teeth: a misspelled node-type key is refused by the same schema."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(AWS)
    config["available_node_types"]["a100x8"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(copy.deepcopy(config)))


def test_aws_node_types_and_install() -> None:
    config = load(AWS)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # no model host on the head
    gpu_types = {t["node_config"]["InstanceType"]: t for t in types.values() if t["resources"].get("GPU")}
    assert gpu_types["p4de.24xlarge"]["resources"]["GPU"] == 8
    assert gpu_types["g5.2xlarge"]["resources"]["GPU"] == 1
    for t in gpu_types.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
        # S3 through an instance profile, never keys
        assert t["node_config"]["IamInstanceProfile"]["Arn"].endswith(":instance-profile/rayq-worker")
    setup = "\n".join(config["setup_commands"])
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in setup
    assert '-c $HOME/rayq/constraints.txt "$HOME/rayq[bnb,gptq]"' in setup
    assert config["file_mounts"]["~/rayq"] == "."
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = "\n".join(config[key])
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=$HOME/.rayq/cluster/auth_token" in start


# ---- KubeRay


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec(doc)
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob":
        pods.append(doc["spec"]["submitterPodTemplate"])
    return [c for pod in pods for c in pod["spec"]["containers"]]


@pytest.mark.parametrize(("path", "kind"), [(RAYJOB, "RayJob"), (RAYCLUSTER, "RayCluster")])
def test_kuberay_manifest_shape(path: Path, kind: str) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1
    doc = docs[0]
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind)
    spec = cluster_spec(doc)
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
    ]
    assert gpu_groups, f"{path.name}: no worker group asks for nvidia.com/gpu"
    for g in gpu_groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    head = spec["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes[mounts["/sweeps"]]["configMap"]["name"] == "rayq-sweeps"  # the sweep file comes from a ConfigMap


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER])
def test_kuberay_token_and_credentials_come_from_secrets(path: Path) -> None:
    doc = load(path)
    for c in ray_containers(doc):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rayq-ray-auth", c["name"]
        for name in SECRET_NAMES:
            assert "value" not in env.get(name, {}), f"{path.name}: {c['name']} writes {name} in the manifest"
        if c["name"] != "ray-job-submitter":
            assert {"secretRef": {"name": "rayq-credentials"}} in c["envFrom"], c["name"]


def test_kuberay_commands_run_the_sweep_on_the_cluster() -> None:
    entry = load(RAYJOB)["spec"]["entrypoint"].split()
    assert entry[:3] == ["rayq", "run", "/sweeps/roy2023.yaml"]
    assert entry[entry.index("--address") + 1] == "auto"
    assert entry[entry.index("--output") + 1].startswith("s3://")
    # A RayCluster has no command of its own: its header shows the submit line.
    submit = re.search(r"^#\s+ray job submit .* -- (rayq run .*)$", RAYCLUSTER.read_text(), re.MULTILINE)
    assert submit and " --address auto " in submit.group(1) + " "


# ---- versions and secrets, across every file


def test_every_ray_version_is_the_pin() -> None:
    """Nodes and clients must run one Ray: the image tags, rayVersion and installs all say the pin."""
    pin = ray_pin()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(pin)}-py311-gpu$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert load(AWS)["docker"]["image"] == f"rayproject/ray:{pin}-py311-gpu"
    for path in (RAYJOB, RAYCLUSTER):
        doc = load(path)
        assert cluster_spec(doc)["rayVersion"] == pin
        for c in ray_containers(doc):
            assert c["image"].endswith(f"-ray{pin}"), f"{path.name}: {c['name']} image {c['image']}"
    version = r"([0-9](?:[0-9A-Za-z.+]*[0-9A-Za-z])?)"  # 2.60.0, 2.61.0rc1; not a trailing dot or quote
    patterns = (
        rf"rayproject/ray:{version}",
        rf"\bray(?:\[[a-z,]+\])?=={version}",
        rf"rayVersion:\s*\"?{version}",
        rf"rayq:\S*-ray{version}",
    )
    files = [*sorted(p for p in CLUSTER.iterdir() if p.is_file()), ROOT / "docs" / "cluster.md"]
    named = set()
    for path in files:
        text = path.read_text()
        for pattern in patterns:
            for found in re.findall(pattern, text):
                assert found == pin, f"{path.relative_to(ROOT)} names Ray {found}; constraints.txt pins {pin}"
                named.add(path.name)
    assert {"Dockerfile", AWS.name, RAYJOB.name, RAYCLUSTER.name, "cluster.md"} <= named  # the scan sees them


@pytest.mark.parametrize("path", [AWS, RAYJOB, RAYCLUSTER, CLUSTER / "Dockerfile", SCRIPT])
def test_no_secret_is_written_in_a_file(path: Path) -> None:
    text = path.read_text()
    for name in SECRET_NAMES:
        assert not re.search(rf"\b{name}\s*[:=]\s*['\"]?[A-Za-z0-9/+_-]{{16,}}", text), f"{path.name}: {name}"
    assert not re.search(r"\b(hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})\b", text), path.name


# ---- bare metal


def test_bare_metal_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_bare_metal_script_passes_shellcheck() -> None:
    subprocess.run(["shellcheck", str(SCRIPT)], check=True)


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The script with this venv's ray and rayq first on PATH; `check` starts nothing."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAYQ_", "RAY_AUTH"))}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.run(["bash", str(SCRIPT), *args], env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_bare_metal_check_reads_the_token_file_and_the_pin(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0" * 64 + "\n")
    token.chmod(0o600)
    ok = run_script("check", RAYQ_AUTH_TOKEN_FILE=str(token), RAYQ_NUM_GPUS="0")
    assert ok.returncode == 0, ok.stderr
    assert f"Ray {ray_pin()}, Python 3.11" in ok.stdout and f"auth: token from {token}" in ok.stdout
    assert "0" * 64 not in ok.stdout + ok.stderr  # the token itself is never printed

    other = run_script("check", RAYQ_AUTH_TOKEN_FILE=str(token), RAYQ_RAY_VERSION="0.0.1")
    assert other.returncode == 1 and "the cluster runs Ray 0.0.1" in other.stderr

    missing = run_script("check")
    assert missing.returncode == 1 and "set RAYQ_AUTH_TOKEN_FILE" in missing.stderr

    usage = run_script("worker")
    assert usage.returncode == 2 and "worker HEAD_IP" in usage.stderr

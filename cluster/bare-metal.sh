#!/usr/bin/env bash
# Start Ray for rayq on machines you already have (docs/cluster.md).
#
#   cluster/bare-metal.sh check             # Ray and Python versions, token, GPUs; starts nothing
#   cluster/bare-metal.sh head              # on the head machine
#   cluster/bare-metal.sh worker HEAD_IP    # on every other machine
#
# Every machine needs rayq installed (README.md), the same Ray and Python, and the results
# location: a shared filesystem mounted at the same path everywhere, or s3://... with keys.
#
# Environment:
#   RAYQ_AUTH_TOKEN_FILE  a file holding the cluster's Ray auth token, the same on every machine
#                         and readable by you only. Make one once:
#                           python3 -c 'import secrets; print(secrets.token_hex(32))' > FILE; chmod 600 FILE
#                         Not read with RAY_AUTH_MODE=disabled (a private network only).
#   RAYQ_NUM_GPUS         GPUs this machine gives Ray (default: as many as nvidia-smi lists, else 0)
#   RAYQ_RAY_VERSION      the Ray every machine must run (default: the ray== pin of constraints.txt)
#   HF_HOME, HF_TOKEN, AWS_*  reach rayq's workers as they are set when Ray starts here
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
constraints="$here/../constraints.txt"

usage() {
    echo "usage:" >&2
    sed -n '4,6p' "${BASH_SOURCE[0]}" | sed 's/^#//' >&2
    exit 2
}

die() {
    echo "bare-metal.sh: $*" >&2
    exit 1
}

pinned_ray_version() {
    if [[ -n "${RAYQ_RAY_VERSION:-}" ]]; then
        echo "$RAYQ_RAY_VERSION"
    elif [[ -r "$constraints" ]]; then
        sed -n 's/^ray==\([^[:space:]]*\).*/\1/p' "$constraints"
    else
        die "no $constraints to read the Ray pin from; set RAYQ_RAY_VERSION"
    fi
}

check_versions() {
    command -v ray >/dev/null || die "ray is not on PATH; install rayq first (README.md)"
    command -v rayq >/dev/null || die "rayq is not on PATH; every machine needs it installed (README.md)"
    local want have py python=()
    want="$(pinned_ray_version)"
    have="$(ray --version | awk '{print $NF}')"
    [[ "$have" == "$want" ]] || die "Ray $have here, but the cluster runs Ray $want: pip install \"ray[default]==$want\""
    # The interpreter of the ray command: every machine must run the same Python minor version.
    read -r -a python <<<"$(head -n 1 "$(command -v ray)" | sed 's/^#![[:space:]]*//')"
    py="$("${python[@]}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    [[ "$py" == "3.11" ]] || die "Ray runs on Python $py here; rayq's cluster needs 3.11 on every machine"
    echo "Ray $have, Python $py"
}

load_token() {
    if [[ "${RAY_AUTH_MODE:-}" == "disabled" ]]; then
        echo "RAY_AUTH_MODE=disabled: anyone who reaches ports 6379 and 8265 can run code here" >&2
        return
    fi
    local file="${RAYQ_AUTH_TOKEN_FILE:-}"
    [[ -n "$file" ]] || die "set RAYQ_AUTH_TOKEN_FILE to the file holding the cluster's token (see the top of this script)"
    [[ -r "$file" ]] || die "RAYQ_AUTH_TOKEN_FILE=$file: no such readable file"
    local token
    token="$(tr -d '[:space:]' <"$file")"
    [[ -n "$token" ]] || die "RAYQ_AUTH_TOKEN_FILE=$file is empty"
    local mode
    mode="$(stat -c %a "$file" 2>/dev/null || true)"
    if [[ -n "$mode" && "${mode: -2}" != "00" ]]; then
        echo "warning: $file can be read by others; chmod 600 $file" >&2
    fi
    # Workers do not turn token mode on by themselves: both variables, on every machine.
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN="$token"
    echo "auth: token from $file"
}

gpu_count() {
    if [[ -n "${RAYQ_NUM_GPUS:-}" ]]; then
        echo "$RAYQ_NUM_GPUS"
    else
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    fi
}

report_env() {
    local name set=()
    for name in HF_HOME HF_TOKEN AWS_ACCESS_KEY_ID AWS_DEFAULT_REGION AWS_ENDPOINT_URL; do
        if [[ -n "${!name:-}" ]]; then
            set+=("$name")
        fi
    done
    echo "passed on to Ray's workers: ${set[*]:-none of HF_HOME, HF_TOKEN, AWS_*}"
}

check() {
    check_versions
    load_token
    echo "GPUs: $(gpu_count)"
    report_env
}

head_ip() {
    local ip
    ip="$(hostname -I 2>/dev/null | awk '{print $1}')"
    echo "${ip:-HEAD_IP}"
}

cmd_head() {
    check
    ray start --head --port=6379 --dashboard-host=0.0.0.0 --num-gpus="$(gpu_count)"
    local ip worker_env client_env
    ip="$(head_ip)"
    if [[ "$RAY_AUTH_MODE" == "token" ]]; then
        worker_env="RAYQ_AUTH_TOKEN_FILE=$RAYQ_AUTH_TOKEN_FILE"
        client_env="RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAYQ_AUTH_TOKEN_FILE"
    else
        worker_env="RAY_AUTH_MODE=disabled"
        client_env="RAY_AUTH_MODE=disabled"
    fi
    cat <<EOF

Ray head started at $ip:6379; dashboard at http://$ip:8265 (it asks for the token).
On every other machine:
  $worker_env cluster/bare-metal.sh worker $ip
Then, from a rayq checkout on any machine with the token file (--output: an absolute path
on the shared filesystem, or s3://..., since the job runs in a copy of the checkout):
  export $client_env
  rayq plan sweeps/roy2023.yaml --address auto         # where the hosts go (on the head)
  ray job submit --address http://$ip:8265 --working-dir . -- \\
    rayq run sweeps/roy2023.yaml --address auto --output /shared/results/roy2023
  rayq status /shared/results/roy2023                  # progress; the same submit resumes
EOF
}

cmd_worker() {
    local head="${1:-}"
    [[ -n "$head" ]] || usage
    check
    ray start --address="$head:6379" --num-gpus="$(gpu_count)"
    echo "joined the Ray cluster at $head:6379; \`ray status\` on the head lists this machine"
}

case "${1:-}" in
    check) check ;;
    head) cmd_head ;;
    worker) cmd_worker "${2:-}" ;;
    *) usage ;;
esac

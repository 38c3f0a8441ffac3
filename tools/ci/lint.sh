#!/usr/bin/env bash
# The linter of CI and `make lint`: ruff's checks and its format check over the whole repository (settings in the
# root pyproject.toml), in a small environment of its own holding only the pinned ruff.
set -euo pipefail
RUFF_VERSION=0.17.6
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
env_dir=$REPO_ROOT/.venvs/lint
if [[ "$("$env_dir/bin/ruff" --version 2>/dev/null)" != "ruff $RUFF_VERSION" ]]; then
    rm -rf "$env_dir"
    "$PYTHON" -m venv "$env_dir"
    "$env_dir/bin/python" -m pip install -q "ruff==$RUFF_VERSION"
fi
cd "$REPO_ROOT"
"$env_dir/bin/ruff" check .
"$env_dir/bin/ruff" format --check .

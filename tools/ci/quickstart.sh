#!/usr/bin/env bash
# `make quickstart`: build (or reuse) .venv with all three packages and vLLM's CPU build, then train the quickstart.
# The run's files and the trained model (model/, named by summary.json) go to runs/quickstart unless --output_dir.
source "$(dirname "$0")/envs.sh"
cd "$REPO_ROOT"
ensure_env .venv -e packages/kernels -e "packages/vllm_standby[cpu]" -e "packages/trl_longctx[test]" -e .
exec .venv/bin/longctx-grpo train configs/grpo/quickstart.yaml "$@"

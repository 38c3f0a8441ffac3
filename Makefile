# The two commands of the README. Both are idempotent: environments are built once and reused.
.PHONY: quickstart test lint

quickstart:
	bash tools/ci/quickstart.sh

test:
	bash tools/ci/test_matrix.sh

lint:
	bash -c 'source tools/ci/envs.sh && ensure_env .venv -e packages/kernels -e "packages/vllm_standby[cpu]" -e "packages/trl_longctx[test]" -e . && .venv/bin/python -m pip install -q ruff && .venv/bin/ruff check . && .venv/bin/ruff format --check .'

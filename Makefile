# The two commands of the README. Both are idempotent: environments are built once and reused.
.PHONY: quickstart test lint

quickstart:
	bash tools/ci/quickstart.sh

test:
	bash tools/ci/test_matrix.sh

lint:
	bash tools/ci/lint.sh

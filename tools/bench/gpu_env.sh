# Source on the lent GPU machine (see ../shared/GPU.md): installs the carried wheels once per warm machine and puts
# the three packages of this checkout on the path. Wheels: a vLLM release and its dependencies (vLLM 0.25 for the
# image's torch 2.11; vLLM 0.31 with torch 2.13 and NCCL 2.29), reassembled from /tmp/stage/part* (carried one part
# per call), plus .whl/ (pytest, ...).
#   source tools/bench/gpu_env.sh
if [[ ! -f /tmp/site/.installed || ! -d /tmp/site/vllm && -n "$(ls /tmp/stage/part* 2>/dev/null)" ]]; then
    if ls /tmp/stage/part* >/dev/null 2>&1; then
        cat /tmp/stage/part* | tar x -C /tmp/stage
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/stage/*.whl
    fi
    [[ -d .whl ]] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    touch /tmp/site/.installed
fi
export PYTHONPATH=$PWD/packages/trl_longctx/src:$PWD/packages/kernels/src:$PWD/packages/vllm_standby/src:/tmp/site
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0 BENCH_COMMIT=${BENCH_COMMIT:-unknown}
export PATH=/tmp/site/bin:$PATH

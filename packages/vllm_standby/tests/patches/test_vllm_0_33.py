"""vLLM 0.33-0.34 patches: contracts with upstream (run where the CUDA build 0.33 or 0.34 is installed)."""

from __future__ import annotations

from patch_contract import contract_tests, skip_outside

from vllm_standby.patches import vllm_0_33

pytestmark = skip_outside(vllm_0_33)
TestContract = contract_tests(vllm_0_33)

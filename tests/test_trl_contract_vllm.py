"""The TRL contract of the shared-weights engine (`trl_longctx.vllm_shared`), which imports vLLM: every method of
TRL's `VLLMGeneration` it overrides has an entry in `trl_contract.TRL_HOOKS`, and `make_generation` passes what TRL's
own `VLLMGeneration(...)` call passes for colocate mode. The trainer's hooks: packages/trl_longctx/tests."""

import ast
import inspect
import textwrap

import pytest

pytest.importorskip("vllm")

from trl.generation.vllm_generation import VLLMGeneration  # noqa: E402

from trl_longctx import trl_contract, vllm_shared  # noqa: E402
from trl_longctx.trl_contract import TRL_HOOKS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # TRL's notice about the installed vLLM version


def test_every_override_of_vllm_generation_has_an_entry_and_every_entry_is_overridden():
    subclass = vllm_shared.SharedWeightsVLLMGeneration
    overridden = {name for name, value in vars(subclass).items() if callable(value) and hasattr(VLLMGeneration, name)}
    declared = {h.name for h in TRL_HOOKS if h.use == "override" and h.owner == trl_contract.VLLM_GENERATION}
    assert overridden == declared


def test_make_generation_passes_what_trl_passes_for_colocate():
    """The same keywords as TRL's call, except the server settings, which colocate mode does not read, and our own
    `merge_adapter`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(vllm_shared.make_generation)))
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "SharedWeightsVLLMGeneration"
    ]
    (call,) = calls
    ours = {k.arg for k in call.keywords}
    (init,) = [h for h in TRL_HOOKS if h.owner == trl_contract.GRPO_TRAINER and h.name == "__init__"]
    trl = set(init.call_keywords["VLLMGeneration"])
    assert ours - trl == {"merge_adapter"}
    assert trl - ours == {"server_base_url", "server_host", "server_port", "group_port", "server_timeout"}

"""The TRL/transformers hooks the trainer relies on, checked from the same data `check_trl_contract()` reads.

Generated per hook (`trl_contract.TRL_HOOKS`: methods, and module-level functions such as TRL's `add_fused_lm_head`,
whose aux loss `moe_aux` mirrors): it exists with the parameters, calls, assignments and call keywords declared, and
its source is the one reviewed for the installed release. Then: every method our subclasses override
on TRL or transformers has an entry; a doctored upstream fails loudly, before any model is loaded, naming the hook.
"""

import logging

import pytest
from trl import GRPOTrainer

from trl_longctx import LongContextGRPOConfig, LongContextGRPOTrainer, trl_contract
from trl_longctx.tasks import copy_letter_reward, make_copy_letter_dataset
from trl_longctx.trl_contract import TRL_HOOKS, Hook, TRLContractError, check_trl_contract, structural_problems

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # TRL's notice about the installed vLLM version


@pytest.mark.parametrize("hook", TRL_HOOKS, ids=lambda h: h.target)
class TestContract:
    def test_exists_with_its_structure(self, hook):
        assert structural_problems(hook, hook.resolve()) == []

    def test_source_reviewed_for_this_release(self, hook):
        release = trl_contract.installed_version(hook.package)
        found = trl_contract.source_sha256(hook.resolve())
        assert hook.source_sha256.get(release) == found, (
            f"{hook.target} on {hook.package} {release} is not the reviewed source: review it ({hook.on_change}), "
            f"then pin {release!r}: {found!r}"
        )


def _overridden(subclass, base) -> set[str]:
    """Methods `subclass` defines itself that `base` (TRL's or transformers') also has."""
    return {name for name, value in vars(subclass).items() if callable(value) and hasattr(base, name)}


def _declared(owners, use="override") -> set[str]:
    return {hook.name for hook in TRL_HOOKS if hook.use == use and hook.owner in owners}


def test_every_trainer_override_has_an_entry_and_every_entry_is_overridden():
    """The same for `SharedWeightsVLLMGeneration` (it needs vLLM): the repository's tests/test_trl_contract_vllm.py."""
    trainer_owners = (trl_contract.GRPO_TRAINER, trl_contract.TRAINER)
    assert _overridden(LongContextGRPOTrainer, GRPOTrainer) == _declared(trainer_owners)


class Doctored(GRPOTrainer):
    """A TRL whose rollouts no longer reach `_generate_single_turn` and whose log-prob hook lost a parameter."""

    def _generate(self, prompts):
        return self._generate_multi_turn(prompts)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep):
        return None


def doctored(name):
    (hook,) = [h for h in TRL_HOOKS if h.owner == trl_contract.GRPO_TRAINER and h.name == name]
    return Hook(**{**vars(hook), "owner": f"{__name__}:Doctored"})


def test_a_doctored_trl_is_refused_naming_the_hook_what_changed_and_what_to_review():
    with pytest.raises(TRLContractError) as error:
        check_trl_contract([doctored("_generate"), doctored("_get_per_token_logps_and_entropies")])
    message = str(error.value)
    assert "Doctored._generate: it no longer calls self._generate_single_turn." in message
    assert (
        "Check that rollouts still reach _generate_single_turn and review LongContextGRPOTrainer._generate" in message
    )
    assert "Doctored._get_per_token_logps_and_entropies: its parameters are ('self', 'model', 'input_ids', " in message
    assert "Install the TRL release trl_longctx supports" in message


def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
    """A TRL whose fused forward computes the aux loss with another function than the one `moe_aux` calls."""
    model.aux = model.switch_loss(model.router_logits, model.num_experts)


def test_a_doctored_module_level_function_is_refused_naming_what_moe_aux_mirrors():
    (hook,) = [h for h in TRL_HOOKS if h.name == "add_fused_lm_head"]
    assert hook.owner == "trl.trainer.utils" and hook.use == "mirrored"
    with pytest.raises(TRLContractError) as error:
        check_trl_contract([Hook(**{**vars(hook), "owner": __name__})])
    message = str(error.value)
    assert f"{__name__}.add_fused_lm_head: it no longer calls load_balancing_loss_func(...)." in message
    assert "Compare its aux-loss block with moe_aux.router_aux_loss" in message
    renamed = Hook(**{**vars(hook), "name": "add_fused_head"})
    with pytest.raises(TRLContractError, match=r"trl\.trainer\.utils\.add_fused_head does not exist in trl 1\.16"):
        check_trl_contract([renamed])


def test_a_missing_hook_is_refused():
    missing = Hook(**{**vars(TRL_HOOKS[0]), "name": "_renamed_upstream"})
    with pytest.raises(TRLContractError, match=r"GRPOTrainer._renamed_upstream does not exist in trl 1\.16"):
        check_trl_contract([missing])


def test_a_changed_call_keyword_is_named():
    init = next(h for h in TRL_HOOKS if h.name == "__init__" and h.owner == trl_contract.GRPO_TRAINER)
    words = (*init.call_keywords["VLLMGeneration"][1:], "new_setting")
    changed = Hook(**{**vars(init), "call_keywords": {"VLLMGeneration": words}})
    with pytest.raises(TRLContractError, match=r"added \['model'\], removed \['new_setting'\]"):
        check_trl_contract([changed])


def test_an_unreviewed_source_with_the_same_structure_warns_and_goes_on(caplog):
    unreviewed = Hook(**{**vars(TRL_HOOKS[1]), "source_sha256": {}})
    with caplog.at_level(logging.WARNING, logger="trl_longctx.trl_contract"):
        assert check_trl_contract([unreviewed]) == [unreviewed.target]
    assert f"reviewed against other sources of {unreviewed.target}" in caplog.text


def test_the_trainer_checks_the_contract_before_loading_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(trl_contract, "TRL_HOOKS", (doctored("_generate"),))
    args = LongContextGRPOConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none")
    with pytest.raises(TRLContractError, match="no longer calls self._generate_single_turn"):
        LongContextGRPOTrainer(
            model=str(tmp_path / "not-loaded"), reward_funcs=copy_letter_reward, args=args,
            train_dataset=make_copy_letter_dataset(8),
        )  # fmt: skip
    assert not (tmp_path / "run").exists()

"""The rollout plan, row by row: what each config gets on each vLLM, and every feature off named with its setting.

The vLLM side is a `VLLMRuntime` (what `VLLMRuntime.detect()` reads off the installed vLLM), so every platform and
version is planned here without vLLM installed; `tests/test_grpo_vllm_plan.py` at the repository root checks the
real CPU engine against the same plans.
"""

import pytest
from peft import LoraConfig
from transformers import BitsAndBytesConfig

from trl_longctx import LongContextGRPOConfig
from trl_longctx.rollout_plan import VLLMRuntime, merge_adapter_default, resolve_rollout_plan

CPU = VLLMRuntime("0.32.0", "cpu", "cpu-worker", bitsandbytes=False)
CUDA_PATCHED = VLLMRuntime("0.25.0", "cuda", "sleep-backend-patch", bitsandbytes=True)
CUDA_API = VLLMRuntime("0.34.0", "cuda", "vllm-api", bitsandbytes=True)
CUDA_NONE = VLLMRuntime("0.26.0", "rocm", None, bitsandbytes=False)
RUNTIMES = {"cpu": CPU, "cuda-patched": CUDA_PATCHED, "cuda-api": CUDA_API}
LORA = LoraConfig(r=8, target_modules="all-linear")
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


def trl_colocate(tmp_path, **overrides):
    """A TRL colocate config as TRL's docs teach it: sleep mode on, utilization 0.3."""
    settings = {
        "output_dir": str(tmp_path), "use_cpu": True, "use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": True,
        "vllm_gpu_memory_utilization": 0.3, "vllm_max_model_length": 512, "report_to": "none",
    }  # fmt: skip
    return LongContextGRPOConfig(**{**settings, **overrides})


def plan(args, model="org/model", peft=LORA, quantization=None, runtime=CPU, rollout_func=False):
    return resolve_rollout_plan(args, model, peft, quantization, has_rollout_func=rollout_func, runtime=runtime)


def notices(result):
    return [n.message() for n in result.notices]


@pytest.mark.parametrize("runtime", RUNTIMES.values(), ids=RUNTIMES)
def test_trl_sleep_mode_config_shares_weights_with_kv_only_standby(tmp_path, runtime):
    """TRL's sleep-mode colocate config with only the import changed: shared weights and KV-only standby, driven by
    the trainer, said in the log line; TRL must build no engine and run no sleep mode of its own."""
    args = trl_colocate(tmp_path)
    result = plan(args, runtime=runtime)
    assert (result.engine, result.shared_weights, result.kv_standby) == ("vllm-colocate", True, "trainer")
    assert result.needs_vllm_standby and not result.trl_sleep_mode and result.notices == ()
    assert result.adapter_transport == ("merged" if runtime.platform == "cuda" else "lora-request")
    line = result.describe()
    assert "shared with the trainer (one copy)" in line and "KV cache released while training" in line
    assert (
        "vllm_enable_sleep_mode=True is honoured" in line
        and "vllm_shared_weights=False, vllm_kv_standby=False" in line
    )
    trl_view = result.trl_args(args)
    assert (trl_view.use_vllm, trl_view.vllm_enable_sleep_mode) == (False, False)
    assert (args.use_vllm, args.vllm_enable_sleep_mode) == (True, True)  # the caller's object is not modified


def test_trls_exact_behaviour_stays_one_setting_away(tmp_path):
    """`vllm_shared_weights=False, vllm_kv_standby=False` on CUDA: TRL's own engine and its sleep mode, no patches,
    and each feature left off is named."""
    args = trl_colocate(tmp_path, vllm_shared_weights=False, vllm_kv_standby=False)
    result = plan(args, runtime=CUDA_API)
    assert (result.shared_weights, result.kv_standby, result.trl_sleep_mode) == (False, "off", True)
    assert not result.needs_vllm_standby and result.adapter_transport == "weight-sync"
    assert notices(result) == [
        "Rollouts: shared weights off: vllm_shared_weights=False. To turn it on: vllm_shared_weights=None (or True)."
    ]
    assert result.trl_args(args).vllm_enable_sleep_mode is True
    assert "TRL's sleep mode (weights and KV cache released while training)" in result.describe()


# Each row: what keeps the weights unshared, and the setting the notice must name to turn them on.
UNSHARED = {
    "full-finetuning": ({"peft": None}, "pass peft_config=LoraConfig(...)"),
    "model-instance": ({"model": object()}, "pass the model as a path or id (model='...')"),
    "fp4": ({"quantization": BitsAndBytesConfig(load_in_4bit=True)}, "bnb_4bit_quant_type='nf4'"),
    "nf4-without-vllm-bitsandbytes": ({"quantization": NF4}, "install a vLLM with bitsandbytes quantization"),
}


@pytest.mark.parametrize("case", UNSHARED.values(), ids=UNSHARED)
def test_each_config_that_cannot_share_says_which_setting(tmp_path, case):
    overrides, remedy = case
    result = plan(trl_colocate(tmp_path), runtime=CPU, **overrides)
    assert not result.shared_weights
    (shared,) = [m for m in notices(result) if "shared weights off" in m]
    assert remedy in shared
    # On the CPU build TRL's sleep mode cannot run: its intent is honoured by the trainer's KV standby.
    assert (result.kv_standby, result.trl_sleep_mode) == ("trainer", False)
    assert "vLLM's CPU build has no sleep mode" in result.describe()


def test_tensor_parallel_keeps_weights_unshared_and_names_the_setting(tmp_path):
    result = plan(trl_colocate(tmp_path, vllm_tensor_parallel_size=2), runtime=CUDA_PATCHED)
    assert not result.shared_weights and any("vllm_tensor_parallel_size=1" in m for m in notices(result))
    assert result.trl_sleep_mode  # CUDA, TRL's engine: TRL's own sleep mode as asked


@pytest.mark.parametrize(
    ("wrapper", "expected"),
    [({"ACCELERATE_USE_FSDP": "true"}, "FSDP shards the trainer's weights"),
     ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3 shards")],
)  # fmt: skip
def test_sharded_weights_keep_weights_unshared_and_name_what_keeps_them_whole(tmp_path, monkeypatch, wrapper,
                                                                               expected):  # fmt: skip
    # The variables `accelerate launch` sets from configs/accelerate/fsdp2.yaml and deepspeed_zero3.yaml.
    if "ACCELERATE_USE_DEEPSPEED" in wrapper:
        pytest.importorskip("deepspeed")
    for name, value in wrapper.items():
        monkeypatch.setenv(name, value)
    try:
        result = plan(trl_colocate(tmp_path), runtime=CUDA_PATCHED)
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # the arguments registered ZeRO-3 for the process
    assert not result.shared_weights
    assert any(expected in m and "configs/accelerate/multi_gpu.yaml" in m for m in notices(result)), notices(result)


@pytest.mark.parametrize(
    ("overrides", "plan_kwargs", "field", "message"),
    [
        ({"vllm_shared_weights": True}, {"peft": None}, "vllm_shared_weights", "needs a LoRA adapter"),
        ({"vllm_shared_weights": True}, {"model": object()}, "vllm_shared_weights", "the model is an instance"),
        ({"vllm_shared_weights": True, "vllm_merge_adapter": True}, {"quantization": NF4, "runtime": CUDA_PATCHED},
         "vllm_shared_weights", "cannot merge a LoRA adapter into 4-bit"),
        ({"vllm_kv_standby": True, "vllm_enable_sleep_mode": False}, {"runtime": CUDA_NONE}, "vllm_kv_standby",
         "has no KV-only standby"),
        ({"vllm_kv_standby": True, "vllm_shared_weights": False, "vllm_enable_sleep_mode": False},
         {"runtime": CUDA_API}, "vllm_kv_standby", "sleep-mode pool"),
        ({"vllm_kv_standby": True, "vllm_shared_weights": False}, {"runtime": CUDA_PATCHED}, "vllm_kv_standby",
         "TRL's sleep mode already releases"),
        ({"vllm_kv_standby": True}, {"rollout_func": True, "peft": None}, "vllm_kv_standby", "custom rollout_func"),
        ({"vllm_shared_weights": True, "vllm_mode": "server"}, {}, "vllm_shared_weights", "colocated in this process"),
        ({"vllm_kv_standby": True, "use_vllm": False}, {}, "vllm_kv_standby", "use_vllm=False"),
    ],
    ids=["full-ft", "instance", "nf4-merge", "no-mechanism", "api-trl-engine", "trl-sleep", "rollout-func",
         "server", "no-vllm"],
)  # fmt: skip
def test_explicit_requests_that_cannot_be_honoured_are_refused(tmp_path, overrides, plan_kwargs, field, message):
    args = trl_colocate(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message) as error:
        plan(args, **plan_kwargs)
    assert str(error.value).startswith(f"{field}=True") and (
        "Allowed" in str(error.value) or "or None" in str(error.value)
    )


def test_kv_only_standby_with_trls_engine_follows_the_vllm_mechanism(tmp_path):
    """Full fine-tuning (TRL's engine), no sleep mode: where vllm_standby's sleep backend exists TRL's own sleep calls
    become KV-only; with vLLM's own release API the KV cache lives outside a sleep pool, so standby is off and the
    notice says what turns it on."""
    args = trl_colocate(tmp_path, vllm_enable_sleep_mode=False)
    patched = plan(args, peft=None, runtime=CUDA_PATCHED)
    assert (patched.kv_standby, patched.trl_sleep_mode, patched.needs_vllm_standby) == ("trl-sleep-calls", True, True)
    api = plan(args, peft=None, runtime=CUDA_API)
    assert (api.kv_standby, api.trl_sleep_mode, api.needs_vllm_standby) == ("off", False, False)
    assert any("KV-only standby off" in m and "vllm_enable_sleep_mode=True" in m for m in notices(api))
    cpu = plan(args, peft=None, runtime=CPU)
    assert (cpu.kv_standby, cpu.needs_vllm_standby) == ("trainer", True)


def test_automatic_features_left_off_are_named(tmp_path):
    kv_off = plan(trl_colocate(tmp_path, vllm_kv_standby=False), runtime=CPU)
    assert kv_off.shared_weights and kv_off.kv_standby == "off"
    assert notices(kv_off) == [
        "Rollouts: KV-only standby off: vllm_kv_standby=False. To turn it on: vllm_kv_standby=None (or True)."
    ]
    no_length = plan(trl_colocate(tmp_path, vllm_max_model_length=None), runtime=CPU)
    assert no_length.kv_cache_sizing == "utilization"
    assert any("KV cache sized to the rollout off" in m and "vllm_max_model_length=" in m for m in notices(no_length))
    no_mechanism = plan(trl_colocate(tmp_path), runtime=CUDA_NONE)
    assert not no_mechanism.shared_weights and any("vllm_shared_weights=True" in m for m in notices(no_mechanism))
    rollout_func = plan(trl_colocate(tmp_path), peft=None, runtime=CPU, rollout_func=True)
    assert rollout_func.kv_standby == "off" and any("custom rollout_func" in m for m in notices(rollout_func))
    server = plan(trl_colocate(tmp_path, vllm_mode="server"), runtime=CPU)
    assert server.engine == "vllm-server" and any("vllm_mode='colocate'" in m for m in notices(server))


def test_qlora_shares_4bit_weights_where_vllm_quantizes(tmp_path):
    result = plan(trl_colocate(tmp_path), quantization=NF4, runtime=CUDA_PATCHED)
    assert result.shared_weights and result.quantized and result.adapter_transport == "lora-request"
    assert "4-bit NF4 weights shared" in result.describe() and result.notices == ()
    nested = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    result = plan(trl_colocate(tmp_path), quantization=nested, runtime=CUDA_PATCHED)
    # vLLM keeps no nested scales: said, with the setting that keeps them.
    assert result.shared_weights and [n.feature for n in result.notices] == [
        "double quantization (bnb_4bit_use_double_quant=True)"
    ]
    assert "vllm_shared_weights=False" in result.notices[0].message()


def test_without_vllm(tmp_path):
    result = plan(trl_colocate(tmp_path, use_vllm=False))
    assert (
        result.engine == "transformers"
        and result.describe() == "Rollout plan: transformers generate (use_vllm=False)."
    )
    with pytest.raises(ValueError, match="use_vllm=True needs vLLM, which is not installed"):
        plan(trl_colocate(tmp_path), runtime=None)


def test_merge_default_follows_the_platform(tmp_path):
    """`vllm_merge_adapter=None`: merged rollouts on CUDA, the in-memory LoRA request on the CPU build and for 4-bit
    weights; an explicit value always wins."""
    args = trl_colocate(tmp_path)
    assert merge_adapter_default(args, quantized=False, platform="cuda") is True
    assert merge_adapter_default(args, quantized=False, platform="cpu") is False
    assert merge_adapter_default(args, quantized=True, platform="cuda") is False
    assert merge_adapter_default(trl_colocate(tmp_path, vllm_merge_adapter=False), False, "cuda") is False


def vl_checkpoint(tmp_path, architecture="Qwen2_5_VLForConditionalGeneration", name="vl"):
    """A folder whose config.json describes a vision-language model of `architecture`."""
    import json

    folder = tmp_path / name
    folder.mkdir()
    config = {"model_type": "qwen2_5_vl", "architectures": [architecture], "vision_config": {"depth": 2}}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_vision_language_checkpoints_share_verified_architectures_only(tmp_path):
    """Qwen2.5-VL and Qwen3-VL share their weights, the vision tower's included; another vision-language architecture,
    or 4-bit weights, keep TRL's engine, said in a notice, and asking for shared weights is refused naming why."""
    args = trl_colocate(tmp_path, vllm_enable_sleep_mode=False)
    for architecture in ("Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"):
        assert plan(args, model=vl_checkpoint(tmp_path, architecture, architecture), runtime=CUDA_API).shared_weights
    other = vl_checkpoint(tmp_path, "LlavaForConditionalGeneration", "llava")
    result = plan(args, model=other, runtime=CUDA_API)
    assert not result.shared_weights
    assert any("LlavaForConditionalGeneration" in n and "shared weights off" in n for n in notices(result))
    with pytest.raises(ValueError, match="vllm_shared_weights=True: .* verified .* LlavaForConditionalGeneration"):
        plan(trl_colocate(tmp_path, vllm_shared_weights=True), model=other, runtime=CUDA_API)
    qwen = vl_checkpoint(tmp_path)
    quantized = plan(args, model=qwen, quantization=NF4, runtime=CUDA_API)
    assert not quantized.shared_weights
    assert any("4-bit shared weights are not verified for vision-language" in n for n in notices(quantized))


def test_vision_language_rollouts_need_torchvision(tmp_path):
    """vLLM processes images with torchvision: where it does not import, vLLM rollouts of a vision-language model are
    refused before loading, naming the import error and use_vllm=False; text models are not affected."""
    from dataclasses import replace

    no_torchvision = replace(CUDA_API, vision_problem="RuntimeError: operator torchvision::nms does not exist")
    args = trl_colocate(tmp_path)
    with pytest.raises(ValueError, match=r"vision-language model .* torchvision::nms .* use_vllm=False"):
        plan(args, model=vl_checkpoint(tmp_path), runtime=no_torchvision)
    assert plan(args, runtime=no_torchvision).shared_weights


def moe_checkpoint(tmp_path, experts_key="num_experts", model_type="qwen3_moe"):
    """A folder whose config.json describes a Mixture-of-Experts model (Qwen3-MoE's or gpt-oss's key)."""
    import json

    model = tmp_path / "moe"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": model_type, experts_key: 8}))
    return str(model)


@pytest.mark.parametrize(
    ("experts_key", "model_type"), [("num_experts", "qwen3_moe"), ("num_local_experts", "gpt_oss")]
)
def test_moe_checkpoint_of_a_mapped_architecture_shares_its_experts_on_cuda(tmp_path, experts_key, model_type):
    """Qwen3-MoE and gpt-oss: vLLM's Triton MoE kernels keep the checkpoint's layout of the fused experts, which
    `vllm_standby.shared_experts` maps to transformers' (checked when the engine is built): shared, merged."""
    model = moe_checkpoint(tmp_path, experts_key, model_type)
    result = plan(trl_colocate(tmp_path), model=model, runtime=CUDA_API)
    assert result.shared_weights and result.adapter_transport == "merged"
    assert not [m for m in notices(result) if "shared weights off" in m]


def test_adapter_on_experts_is_merged_not_handed_to_vllm_as_a_request(tmp_path):
    """LoRA on fused experts (`target_parameters`) reaches vLLM merged into the shared weights; an in-memory LoRA
    request of it (`vllm_merge_adapter=False`) is refused, naming what is allowed."""
    experts = LoraConfig(r=8, target_modules="all-linear", target_parameters=["mlp.experts.gate_up_proj"])
    model = moe_checkpoint(tmp_path)
    assert plan(trl_colocate(tmp_path), model=model, peft=experts, runtime=CUDA_API).adapter_transport == "merged"
    with pytest.raises(
        ValueError, match=r"^vllm_merge_adapter=False .* adapts parameters \(\['mlp.experts.gate_up_proj'\]"
    ):
        plan(trl_colocate(tmp_path, vllm_merge_adapter=False), model=model, peft=experts, runtime=CUDA_API)


def test_moe_checkpoint_it_cannot_view_keeps_trls_engine_and_says_why(tmp_path):
    """An unmapped MoE architecture, or 4-bit / FP8 experts (laid out by vLLM's quantized MoE kernels): TRL's engine
    syncs the weights, with a notice naming why; asking for shared weights is refused."""
    model = moe_checkpoint(tmp_path, model_type="mixtral")
    result = plan(trl_colocate(tmp_path), model=model, runtime=CUDA_API)
    assert not result.shared_weights and result.adapter_transport == "weight-sync"
    (shared,) = [m for m in notices(result) if "shared weights off" in m]
    assert "mapped to transformers' for model_type ['gpt_oss', 'qwen3_moe'] only, not 'mixtral'" in shared
    with pytest.raises(ValueError, match=r"^vllm_shared_weights=True: the model has 8 experts .* not 'mixtral'"):
        plan(trl_colocate(tmp_path, vllm_shared_weights=True), model=model, runtime=CUDA_API)
    (tmp_path / "qwen").mkdir()
    qwen = moe_checkpoint(tmp_path / "qwen")
    four_bit = plan(trl_colocate(tmp_path), model=qwen, quantization=NF4, runtime=CUDA_API)
    assert not four_bit.shared_weights
    assert any("vLLM quantizes (4-bit) in a fused layout" in m for m in notices(four_bit))
    blackwell = VLLMRuntime("0.34.0", "cuda", "vllm-api", bitsandbytes=True, capability=(10, 0))
    on_blackwell = plan(trl_colocate(tmp_path), model=qwen, runtime=blackwell)
    assert not on_blackwell.shared_weights
    assert any(
        "compute capability 10.0) vLLM runs them on FlashInfer's MoE kernels" in m for m in notices(on_blackwell)
    )
    with pytest.raises(ValueError, match=r"vllm_fp8_weights='per-channel' needs shared weights .* quantizes \(FP8\)"):
        plan(trl_colocate(tmp_path, vllm_fp8_weights="per-channel"), model=qwen, runtime=HOPPER)


@pytest.mark.parametrize("peft", [LORA, None], ids=["lora", "full-finetuning"])
def test_moe_on_vllms_cpu_build_is_refused_naming_the_setting(tmp_path, peft):
    """vLLM's CPU build prepacks expert weights at load and TRL's weight sync overwrites them unpacked (rollouts from
    scrambled experts, no error): refused before anything loads, for a path or a model instance."""
    import transformers

    message = r"^use_vllm=True, but vLLM 0\.32\.0 \(cpu\) cannot roll out a Mixture-of-Experts model \(8 experts"
    with pytest.raises(ValueError, match=message) as error:
        plan(trl_colocate(tmp_path), model=moe_checkpoint(tmp_path), peft=peft, runtime=CPU)
    assert str(error.value).endswith("Allowed here: use_vllm=False (and use_vllm_when_available=False): "
                                     "transformers' generate.")  # fmt: skip

    class Instance:
        config = transformers.Qwen3MoeConfig(num_experts=8)

    with pytest.raises(ValueError, match=message):
        plan(trl_colocate(tmp_path), model=Instance(), peft=peft, runtime=CPU)
    assert plan(trl_colocate(tmp_path, use_vllm=False), model=moe_checkpoint(tmp_path), runtime=CPU).engine == (
        "transformers"
    )


# FP8 shared weights (`vllm_fp8_weights`): the CUDA runtimes as `VLLMRuntime.detect()` reads them on each GPU.
FP8_KINDS = ("per-channel", "per-tensor", "per-block")
HOPPER = VLLMRuntime("0.34.0", "cuda", "vllm-api", bitsandbytes=True, fp8=FP8_KINDS, capability=(9, 0))
AMPERE = VLLMRuntime("0.34.0", "cuda", "vllm-api", bitsandbytes=True, fp8=FP8_KINDS, capability=(8, 0))
CPU_FP8 = VLLMRuntime("0.32.0", "cpu", "cpu-worker", bitsandbytes=False, fp8=FP8_KINDS)  # what the CPU build reports


@pytest.mark.parametrize(("kind", "matmul"), [("per-channel", "dequantize"), ("per-tensor", "dequantize"),
                                              ("per-block", "dequantize"), ("per-channel", "scaled_mm"),
                                              ("per-tensor", "scaled_mm")])  # fmt: skip
def test_fp8_shares_fp8_weights_and_names_the_importance_sampling(tmp_path, kind, matmul):
    """On Hopper with LoRA: FP8 views of vLLM's weights, the adapter as a LoRA request (never merged into FP8), the
    trainer's matmul as `vllm_fp8_matmul` asks, and TRL's importance-sampling settings in the log line."""
    args = trl_colocate(tmp_path, vllm_fp8_weights=kind, vllm_fp8_matmul=matmul, vllm_importance_sampling_clip_min=0.5)
    result = plan(args, runtime=HOPPER)
    assert (result.shared_weights, result.fp8, result.fp8_matmul) == (True, kind, matmul)
    assert result.adapter_transport == "lora-request" and result.kv_standby == "trainer" and result.notices == ()
    line = result.describe()
    matmul_text = {
        "dequantize": "dequantized to bf16 per matmul; vllm_fp8_matmul='scaled_mm' multiplies FP8 by FP8",
        "scaled_mm": "FP8 by FP8 through torch._scaled_mm (vllm_fp8_matmul='scaled_mm')",
    }[matmul]
    assert f"FP8 weights ({kind} scales; the trainer's base matmuls: {matmul_text})" in line
    assert "shared with the trainer (one copy), the adapter as an in-memory LoRA request" in line
    assert (
        "TRL corrects each step by importance sampling (vllm_importance_sampling_correction=True, "
        "vllm_importance_sampling_mode='sequence_mask', clip [0.5, 3.0]) and logs the gap as "
        "sampling/sampling_logp_difference." in line
    )


def test_fp8_explicit_sharing_holds_without_kv_standby(tmp_path):
    """FP8 asks for shared weights: where KV standby is missing they are shared all the same (KV cache held)."""
    no_standby = VLLMRuntime("0.34.0", "cuda", None, bitsandbytes=True, fp8=FP8_KINDS, capability=(9, 0))
    result = plan(trl_colocate(tmp_path, vllm_fp8_weights="per-channel"), runtime=no_standby)
    assert (result.shared_weights, result.fp8, result.kv_standby) == (True, "per-channel", "off")


# Each row: what the run has, the plan's arguments, and what the refusal must say (why, then what to use instead).
FP8_REFUSALS = {
    "cpu": ({}, {"runtime": CPU_FP8}, r"vLLM 0.32.0 \(cpu\) runs on the CPU: FP8 matmuls need a CUDA GPU.*Allowed "
            r"here: bf16 shared weights \(vllm_fp8_weights=None\) on the CPU\.$"),
    "pre-hopper": ({}, {"runtime": AMPERE}, r"compute capability >= 8\.9 \(Ada, Hopper or newer\); this one has 8\.0 "
                   r"\(vLLM would repack .* Marlin.*Allowed here: bf16 shared weights .* or 4-bit NF4 ones \(QLoRA"),
    "no-gpu": ({}, {"runtime": VLLMRuntime("0.34.0", "cuda", "vllm-api", True, fp8=FP8_KINDS)},
               r"sees no CUDA GPU, and FP8 matmuls need one of compute capability >= 8\.9"),
    "rocm": ({}, {"runtime": VLLMRuntime("0.34.0", "rocm", "vllm-api", False, fp8=FP8_KINDS)},
             r"built and verified for CUDA only .*float8_e4m3fnuz on ROCm"),
    "no-online-fp8": ({"vllm_fp8_weights": "per-block"},
                      {"runtime": VLLMRuntime("0.34.0", "cuda", "vllm-api", True, fp8=("per-channel",),
                                              capability=(9, 0))},
                      r"cannot quantize a checkpoint to FP8 per-block while loading it \(no "
                      r"quantization='fp8_per_block'; it has \['per-channel'\]\)"),
    "qlora": ({}, {"runtime": HOPPER, "quantization": NF4}, r"a quantization_config \(4-bit QLoRA\) quantizes the "
              r"weights already.*Allowed here: drop the quantization_config, or vllm_fp8_weights=None for QLoRA"),
    "full-ft": ({}, {"runtime": HOPPER, "peft": None}, r"needs shared weights \(the trainer's FP8 layers are views of "
                r"vLLM's\): it needs a LoRA adapter.*Allowed here: pass peft_config=LoraConfig\(\.\.\.\), or "
                r"vllm_fp8_weights=None\."),
    "instance": ({}, {"runtime": HOPPER, "model": object()}, r"needs shared weights.*the model is an instance"),
    "tensor-parallel": ({"vllm_tensor_parallel_size": 2}, {"runtime": HOPPER},
                        r"needs shared weights.*vllm_tensor_parallel_size=2"),
    "server": ({"vllm_mode": "server"}, {"runtime": HOPPER}, r"needs vLLM colocated in this process with shared "
               r"weights .*this run has vllm_mode='server'\. Allowed here: None\."),
    "no-vllm": ({"use_vllm": False}, {"runtime": HOPPER}, r"this run has use_vllm=False"),
}  # fmt: skip


@pytest.mark.parametrize("case", FP8_REFUSALS.values(), ids=FP8_REFUSALS)
def test_fp8_where_it_cannot_run_is_refused_saying_why_and_what_instead(tmp_path, case):
    overrides, plan_kwargs, message = case
    args = trl_colocate(tmp_path, **{"vllm_fp8_weights": "per-channel", **overrides})
    with pytest.raises(ValueError, match=message) as error:
        plan(args, **plan_kwargs)
    assert str(error.value).startswith(f"vllm_fp8_weights={args.vllm_fp8_weights!r}")
    assert "Allowed here: " in str(error.value)


def test_fp8_off_where_it_could_run_is_named(tmp_path):
    """bf16 shared weights on Hopper: a notice names `vllm_fp8_weights`; where FP8 cannot run (CPU, Ampere, QLoRA) or
    the weights are not shared, no FP8 notice."""
    (message,) = notices(plan(trl_colocate(tmp_path), runtime=HOPPER))
    assert message.startswith("Rollouts: FP8 base weights off: vllm_fp8_weights=None (the checkpoint's dtype). To turn "
                              "it on: vllm_fp8_weights='per-channel'")  # fmt: skip
    assert plan(trl_colocate(tmp_path), runtime=HOPPER).fp8 is None
    for runtime, kwargs in ((CPU_FP8, {}), (AMPERE, {}), (HOPPER, {"quantization": NF4}), (HOPPER, {"peft": None})):
        assert not any("FP8" in m for m in notices(plan(trl_colocate(tmp_path), runtime=runtime, **kwargs)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vllm_fp8_weights": "fp8"},
         r"vllm_fp8_weights must be None or one of \['per-channel', 'per-tensor', 'per-block'\], got 'fp8'\."),
        ({"vllm_fp8_weights": "per-channel", "vllm_shared_weights": False},
         r"vllm_fp8_weights='per-channel' needs vllm_shared_weights=None or True .*got False; or set "
         r"vllm_fp8_weights=None\."),
        ({"vllm_fp8_weights": "per-tensor", "vllm_merge_adapter": True},
         r"vllm_fp8_weights='per-tensor' needs vllm_merge_adapter=None or False: .*got True\."),
        ({"vllm_fp8_weights": "per-block", "vllm_importance_sampling_correction": False},
         r"vllm_fp8_weights='per-block' needs vllm_importance_sampling_correction=True: .*got False\."),
    ],
    ids=["bad-value", "unshared", "merged", "no-is-correction"],
)  # fmt: skip
def test_fp8_settings_the_config_alone_refuses(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        trl_colocate(tmp_path, **overrides)


def test_fp8_matmul_choices_are_vllm_standbys():
    """`vllm_fp8_matmul`'s choices are `Fp8Linear`'s resolved matmuls (the config keeps them as text)."""
    from trl_longctx.longctx_grpo_config import VLLM_FP8_MATMULS
    from vllm_standby.fp8_linear import MATMULS

    assert set(VLLM_FP8_MATMULS) == set(MATMULS) - {"auto"}


def test_fp8_matmul_scaled_mm_needs_row_scales(tmp_path):
    with pytest.raises(ValueError, match=r"vllm_fp8_matmul='scaled_mm' needs vllm_fp8_weights='per-channel' or "
                                         r"'per-tensor' .*got vllm_fp8_weights='per-block'"):  # fmt: skip
        trl_colocate(tmp_path, vllm_fp8_weights="per-block", vllm_fp8_matmul="scaled_mm")
    with pytest.raises(ValueError, match=r"got vllm_fp8_weights=None; or set vllm_fp8_matmul='dequantize'"):
        trl_colocate(tmp_path, vllm_fp8_matmul="scaled_mm")

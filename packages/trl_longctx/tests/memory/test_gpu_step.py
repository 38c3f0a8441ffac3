"""On CUDA: the trainer's long-context step (offloaded checkpoints on a side stream + tiled MLPs + Triton log-probs,
LoRA, bf16 autocast) against the same step with all of them off, both against a float64 reference; and nothing left
pinned or allocated afterwards. Skipped without CUDA; run on the lent GPU (docs/benchmarks.md records the run)."""

import copy
import gc

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trl_longctx.memory import CheckpointOffloader, tile_mlps

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

# bf16 autocast: max error against the float64 reference <= factor x the error of the plain bf16 step + slack
# (STYLE.md §3's relative rule, as in test_tiled_mlp.py).
BF16 = {"logps": {"factor": 2.0, "slack": 2e-2}, "grads": {"factor": 2.0, "slack": 1e-3}}
VOCAB, LAYERS = 4096, 4


def build(arch: str):
    import transformers

    common = {"vocab_size": VOCAB, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": LAYERS,
                  "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 8192,
                  "tie_word_embeddings": False}  # fmt: skip
    config = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}[arch](**common)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False))
    model.enable_input_require_grads()
    return model.train()


def step(model, input_ids, keep, *, long_context: bool, dtype=torch.bfloat16, offloader=None):
    """Per-token log-probs of the last `keep` tokens, a GRPO-like loss, backward; returns (logps, LoRA grads)."""
    from longctx_kernels import selective_logprobs
    from trl_longctx.model_heads import decoder_and_lm_head

    model.zero_grad(set_to_none=True)
    decoder, lm_head = decoder_and_lm_head(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    if long_context:
        with autocast, offloader.offload(model), tile_mlps(model, 3):
            hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        hidden = hidden[:, -keep - 1 : -1].to(lm_head.weight.dtype)
        logps = selective_logprobs(hidden, lm_head.weight, input_ids[:, -keep:], backend="triton")
    else:
        with autocast:
            logits = model(input_ids=input_ids, use_cache=False).logits[:, -keep - 1 : -1]
        logps = logits.to(dtype if dtype == torch.float64 else torch.float32).log_softmax(-1)
        logps = logps.gather(-1, input_ids[:, -keep:, None]).squeeze(-1)
    advantages = torch.linspace(-1, 1, input_ids.size(0), device="cuda", dtype=logps.dtype)[:, None]
    (-(torch.exp(logps - logps.detach()) * advantages).mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def assert_error_within(actual, baseline, reference, what: str, factor: float, slack: float) -> None:
    error = (actual.double() - reference).abs().max().item()
    bound = factor * (baseline.double() - reference).abs().max().item() + slack
    assert error <= bound, f"{what}: max abs error {error:.3g}, allowed {bound:.3g}"


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_long_context_step_matches_plain_step_in_bf16(arch):
    model = build(arch)
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 3000), device="cuda")
    keep = 2000
    reference = step(copy.deepcopy(model).double(), input_ids, keep, long_context=False, dtype=torch.float64)
    baseline = step(model, input_ids, keep, long_context=False)
    offloader = CheckpointOffloader()
    ours = step(model, input_ids, keep, long_context=True, offloader=offloader)
    assert offloader.offloaded_count == LAYERS - 1  # every layer's input but the last went through pinned memory
    assert_error_within(ours[0], baseline[0], reference[0], "logps", **BF16["logps"])
    assert ours[1].keys() == baseline[1].keys() == reference[1].keys() and len(ours[1]) == 2 * 7 * LAYERS
    for name, grad in ours[1].items():
        assert_error_within(grad, baseline[1][name], reference[1][name], name, **BF16["grads"])
    offloader.release()
    assert offloader.pool_bytes == 0 and offloader.buffers_in_use == 0


def test_nothing_left_allocated_or_pinned_after_steps():
    model = build("qwen3")
    input_ids = torch.randint(0, VOCAB, (2, 4096), device="cuda")
    offloader = CheckpointOffloader()
    step(model, input_ids, 3000, long_context=True, offloader=offloader)  # first step: AdamW-free, grads exist
    torch.cuda.synchronize()
    after_first = torch.cuda.memory_allocated()
    pool = offloader.pool_bytes
    for _ in range(5):
        step(model, input_ids, 3000, long_context=True, offloader=offloader)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == after_first  # same shapes: no growth on the GPU
    assert offloader.pool_bytes == pool > 0  # the pinned buffers are reused, not added to
    offloader.release()
    assert offloader.pool_bytes == 0
    model.zero_grad(set_to_none=True)
    del model
    gc.collect()
    # cuBLAS keeps a workspace per (handle, stream) in the caching allocator (here two streams: compute and the
    # offloader's copies); torch frees them on request. What is left then is ours.
    torch._C._cuda_clearCublasWorkspaces()
    assert torch.cuda.memory_allocated() < 2**20  # weights, grads and activations all gone

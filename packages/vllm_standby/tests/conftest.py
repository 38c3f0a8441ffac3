"""Shared fixtures: a seed, a tiny random Qwen3 checkpoint with a local tokenizer, one in-process vLLM engine."""

from __future__ import annotations

import copy
import os
import random

# In-process engine: the tests reach the model and the KV cache directly. Set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest
import torch

# The opt-in switch as the user left it, before any engine of this session started (StandbyLLM scopes its own).
USER_VLLM_STANDBY = os.environ.get("VLLM_STANDBY")

TINY_QWEN3 = {
    "vocab_size": 96,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": None,
}
PROMPTS = [[5, 17, 9, 30, 12, 8], [40, 41, 42], [7, 7, 7, 7, 60, 3, 88, 20, 19]]
MAX_TOKENS = 8
KV_CACHE_BYTES = 64 * 2**20
LORA_RANK = 8
# vLLM's CUDA LoRA kernels take fp16/bf16 only: on a GPU the engine (and the transformers model it is compared with)
# runs in bf16; on CPU both run in fp32.
VLLM_DTYPE = "bfloat16" if torch.cuda.is_available() else "float32"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def tiny_qwen3(seed: int, initializer_range: float = 0.02):
    """A random tiny Qwen3ForCausalLM (fp32, eval mode)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**TINY_QWEN3, initializer_range=initializer_range)
    return transformers.Qwen3ForCausalLM(config).eval()


def _save_char_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz .,!?":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """Directory with a tiny random Qwen3 checkpoint (seed 0, fp32) and a character-level tokenizer."""
    path = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_qwen3(seed=0, initializer_range=0.1).save_pretrained(path)
    _save_char_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def vllm_llm(tiny_qwen3_dir):
    """One in-process ``StandbyLLM`` (a ``vllm.LLM``) on the tiny model (it opts this process in); 64 MiB KV cache."""
    import vllm_standby

    llm = vllm_standby.StandbyLLM(
        str(tiny_qwen3_dir),
        dtype=VLLM_DTYPE,
        enforce_eager=True,
        max_model_len=128,
        max_num_seqs=4,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        seed=0,
        enable_lora=True,
        max_lora_rank=LORA_RANK,
        max_loras=1,
    )
    yield llm
    del llm


def greedy_vllm(llm, prompts=PROMPTS, max_tokens=MAX_TOKENS, **kwargs) -> list[list[int]]:
    """Greedy token ids from vLLM; EOS masked so that every output has ``max_tokens`` tokens."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, **kwargs)
    return [list(o.outputs[0].token_ids) for o in outs]


@torch.no_grad()
def greedy_hf(model, prompts=PROMPTS, max_tokens=MAX_TOKENS) -> list[list[int]]:
    """Greedy token ids from transformers ``generate``, EOS masked like :func:`greedy_vllm`, in vLLM's dtype."""
    if VLLM_DTYPE == "bfloat16" and model.dtype != torch.bfloat16:
        model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    result = []
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
        )
        result.append(out[0, len(p) :].tolist())
    return result


# bf16 (CUDA): vLLM's LoRA kernels and transformers' bf16 matmuls round differently, so a greedy path may take the
# other token of a near-tie. A token is accepted when the float32 model scores it within this many logits of its own
# argmax on the same prefix (teacher forcing); an adapter applied wrongly moves logits by whole units.
BF16_GREEDY_LOGIT_GAP = 0.125


@torch.no_grad()
def assert_greedy_equivalent(model, outputs: list[list[int]], prompts=PROMPTS) -> None:
    """`outputs` (vLLM's greedy tokens) are `model`'s greedy tokens: exactly in float32 (CPU), and in bf16 each token
    within `BF16_GREEDY_LOGIT_GAP` of the float32 model's best logit on the same prefix."""
    if VLLM_DTYPE != "bfloat16":
        assert outputs == greedy_hf(model, prompts), "vLLM's greedy tokens differ from transformers'"
        return
    model = copy.deepcopy(model).to("cuda", torch.float32)
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt + out], device="cuda")
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        chosen = logits.gather(-1, torch.tensor(out, device="cuda")[:, None]).squeeze(-1)
        gaps = logits.max(-1).values - chosen
        assert gaps.max().item() <= BF16_GREEDY_LOGIT_GAP, (
            f"prompt {prompt}: vLLM's token at step {gaps.argmax().item()} is {gaps.max().item():.3f} logits below "
            f"the float32 argmax (allowed {BF16_GREEDY_LOGIT_GAP}); gaps {gaps.tolist()}"
        )


def _report_errors(target, errors, *args) -> None:
    import traceback

    try:
        target(*args)
    except BaseException:
        errors.put(traceback.format_exc())
        raise


def run_in_child(target, *args, timeout: float = 600) -> None:
    """Run `target(*args)` in a fresh (spawned) process and fail with its traceback if it raises.

    For GPU tests that need their own vLLM engine: one sleep-mode engine lives per process (its CuMem allocator is a
    process-wide singleton), and the session's `vllm_llm` lives in this one. `target` must be a module-level function.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    child = context.Process(target=_report_errors, args=(target, errors, *args))
    child.start()
    child.join(timeout=timeout)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, errors.get() if not errors.empty() else f"child exit code {child.exitcode}"


def vllm_token_logprobs(llm, sequences, lora_request=None) -> torch.Tensor:
    """vLLM's log-probs of each sequence's tokens after the first (teacher forced, `prompt_logprobs`), concatenated."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(
        [{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False, lora_request=lora_request
    )
    values = [o.prompt_logprobs[i][t].logprob for o, s in zip(outs, sequences) for i, t in enumerate(s) if i > 0]
    return torch.tensor(values, dtype=torch.float64)


@torch.no_grad()
def hf_token_logprobs(model, sequences) -> torch.Tensor:
    """transformers' log-probs of the same tokens as `vllm_token_logprobs`, concatenated (float64)."""
    values = []
    for s in sequences:
        ids = torch.tensor([s], device="cuda")
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        values.append(logps.gather(1, ids[0, 1:, None])[:, 0].cpu())
    return torch.cat(values)

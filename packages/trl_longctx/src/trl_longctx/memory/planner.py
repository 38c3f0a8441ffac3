"""Predict the peak GPU memory of one GRPO training step, by component, and the longest completion that fits.

Plain Python, no torch: `longctx-grpo plan` answers before anything heavy is imported.

The step, as `LongContextGRPOTrainer` runs it with gradient checkpointing (non-reentrant), SDPA attention and bf16
autocast: the decoder runs forward over `m` sequences at a time (`grpo_mini_batch`, `B / m` mini-batches in one
graph), keeping only each layer's input; the log-probs of the `m * L` completion tokens come from the lm_head; then
the backward runs the last mini-batch first and, inside it, recomputes one layer at a time from the top. Notation:
`H` hidden size, `I` MLP intermediate size, `q = heads * head_dim`, `kv = kv_heads * head_dim`, `T = P + L` tokens
per sequence, `N = m * T` and `N_p = m * L` tokens of one mini-batch; "per token" means per one of the `N` tokens;
bf16 = 2 bytes, fp32 = 4.

Phase A, the peak for every path that never holds `[N_p, V]` logits: the end of the recompute of one decoder layer
(the LoRA down projection casts its `[N, I]` input to fp32 for the fp32 adapter, then autocast casts it back).
Bytes alive then, each derived from the ops of transformers 5.17's Llama/Qwen3 layers and PEFT 0.21's `lora.Linear`
(`layer_recompute_bytes_per_token` itemizes them):

- weights: bf16 base `2 * params` (QLoRA: NF4 linears, 0.5625 B/param, 0.516 with nested scales, plus one
  dequantized bf16 weight); full fine-tuning adds bf16 grads and AdamW's two moments (8 B/param);
- LoRA: `r * (in + out)` parameters per adapted linear, fp32 (PEFT upcasts the adapters of bf16 models): parameter
  4 B + AdamW 8 B, and 4 B of gradient for each layer whose backward is done (`layers - 2` with offload, where the
  peak is at layer 1; none without, where it is at the top layer). QLoRA: bf16 adapters (TRL casts them), 2 B each;
- checkpointed layer inputs `c * N * 2H`: `c = layers` without offload. With `CheckpointOffloader`, `c = 3`: the
  input being recomputed from, the next one prefetched, and the embedding output: with PEFT, TRL calls
  `enable_input_require_grads`, which makes that output an autograd leaf the graph keeps alive, so offloading layer
  0's input frees nothing on the GPU (`checkpoint_inputs_on_gpu`). Each other mini-batch adds its `layers` inputs,
  or with offload its last layer's input and its embedding output;
- recompute of one layer, per token (LoRA): saved for its backward `4H` (input norm, fp32) + `6H` (bf16 copies of
  the q, k, v adapter inputs: PEFT casts `x` to fp32, autocast casts it back for the matmul, that copy is saved) +
  `4q + 4kv` (Qwen3 q/k norms, fp32) + `4q + 4kv` (SDPA's q, k, v and output) + `4 heads` (SDPA's fp32
  logsumexp) + `2q` (o adapter input) + `4H` (post-attention norm) + `4H` (gate and up adapter inputs) + `6I`
  (gate, up and silu(gate)); forward values still referenced `2H` (residual) + `2H` (MLP input) + `2I` (product)
  + `2H` (down output); the down adapter's cast `4I + 2I`; gradients `2H` (of the layer output) + `2H` (its
  LoRA-scaled copy, made before the first saved tensor is unpacked). Qwen3-8B: 336,000 B = 41.0 x `2H`;
  Llama-3.1-8B: 344,192 B = 42.0 x `2H`;
- LoRA dropout (`lora_dropout > 0`; PEFT runs `lora_A(dropout(x))` per adapter, `nn.Identity` at 0): each
  adapter's dropout keeps its bool mask for the backward, 1 B per input element; with bf16 adapters (QLoRA) `lora_A`
  saves the dropout's bf16 output in place of the input the adapters of q/k/v and of gate/up shared; with fp32
  adapters the saved bf16 cast is already counted, and the down adapter's fp32 dropout output `4I` joins the cast at
  the peak (`lora_dropout_bytes_per_token` itemizes them; Qwen3-8B QLoRA: 69,632 B per token). TRL's `ModelConfig`
  defaults to 0.05, PEFT's `LoraConfig` to 0: the fit's steps ran at 0;
- other mini-batches (not yet back-propagated): each keeps its final norm's fp32 input `N * 4H` and the log-prob
  kernel's saved tensors (`selective_logprobs`: hidden rows + their stored gradient, `N_p * 4H`; TRL: `N_p * 2H`);
- rotary tables `2 * T * head_dim * 2` per mini-batch;
- vision-language models: what the vision tower keeps for its backward, for this and every other mini-batch not yet
  back-propagated (`vision_saved_bytes_per_patch`, when the tower takes gradients; a frozen tower keeps nothing). The
  image tokens themselves are part of `P` (the processor writes one token per merged patch into the prompt).

Attention is linear in `T` in both of the attentions the planner models (`TrainSetup.attention`): SDPA's fused
kernels, and `"longctx_flex"` (`trl_longctx.attention`: compiled flex attention, which saves the same q, k, v,
output and fp32 logsumexp, never a `[T, T]` score matrix) with attention sinks, whose folding keeps `6 heads` more
bytes per token (the sink factor, fp32 from its sigmoid and its bf16 cast for the product). Eager attention, which
holds `[m, heads, T, T]` scores, is not modelled.

Phase B, the log-prob step of the first mini-batch back-propagated, on top of the same weights and checkpoints
(offload: the last layer's input and the embedding output): its final norm's saved fp32 input `N * 4H`, the last
hidden state `N * 2H`, and the path's own tensors:

- ours (`selective_logprobs`, Triton): hidden rows `N_p * 2H` (a copy when `m > 1`) + the gradient it stores in the
  forward `N_p * 2H` + a `[1024, 16384]` bf16 tile and a `[1024, H]` fp32 accumulator; torch backend: `[C, V]`
  chunks at 12 B per logit (bf16 product, fp32 logits, fp32 probabilities, bf16 gradient) instead of the tile;
- TRL 1.16 (`add_fused_lm_head`, `trl/kernels/chunked_logprob.py`): no logits either; `[4096, 32768]` bf16 tiles;
  its backward holds the saved hidden rows `N_p * 2H`, an fp32 gradient `N_p * 4H` and its bf16 cast `N_p * 2H`;
- materialized logits (TRL before 1.16, which computes the log-probs from full logits): 8 B per logit, four
  bf16 `[N_p, V]` tensors (logits, temperature-scaled logits, log-softmax output saved for the backward, gradient);
- the final norm's backward `N * 24H` (its fp32 input and five fp32 `[N, H]` temporaries of pow/mean/rsqrt).

Mixture-of-Experts models: the terms of their MoE layers and routers are `moe_terms`'s (its docstring); experts and
routers are bf16 weights in every mode, and `ACTIVATION_SCALE` was fitted on dense models.

The prediction is the larger phase: `allocated` is what `torch.cuda.max_memory_allocated` should show. `total` adds
what the GPU needs beyond that: allocator fragmentation (a fraction of the peak) and the CUDA context.

Vision tower, assumed from its ops (Qwen2.5-VL and Qwen3-VL; not measured, not scaled): with gradient checkpointing
each of its `depth` blocks keeps its input `[patches, Hv]` in bf16; each patch merger (Qwen3-VL: the main one and one
per deepstack layer) keeps its norm's fp32 input and the bf16 input, pre-activation and activation of its MLP, which
runs over `patches / 4` rows of `4 Hv`: `10 Hv` bytes per patch; the patch embedding keeps its bf16 input, the patch
pixels. The recompute of one vision block runs after the language decoder's backward of its mini-batch and is assumed
below the decoder's peak; the tower's weights (and adapters) are not counted (`auto_chunk_sizes` measures free memory
with them loaded).

Fitted: only `ACTIVATION_SCALE`, one global factor on the per-token activation terms of both phases (not on weights,
optimizer states or checkpoint inputs, which are exact): least squares on the relative error against measured
`max_memory_allocated` peaks of this step, some measured steps kept out of the fit to check it. Allocator
fragmentation cannot be fitted that way (allocated bytes are measured, not reserved ones): `FRAGMENTATION` is an
assumption, below what the longest measured step that fitted on its GPU leaves room for.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from .moe_terms import (
    adapted_expert_bytes,
    moe_layer_bytes_per_token,
    router_logits_bytes_per_token,
)
from .shapes import (
    BF16,
    FP32,
    GIB,
    NF4_BYTES_PER_PARAM,
    NF4_NESTED_BYTES_PER_PARAM,
    ModelShape,
    _check_int,
    vision_saved_bytes_per_patch,
)

MODES = ("lora", "qlora", "full")
LOGPROB_PATHS = ("fused", "trl", "materialized")
LOGPROB_BACKENDS = ("triton", "torch")
# Attentions the recompute working set is modelled for: SDPA's fused kernels; our flex attention with sinks.
ATTENTIONS = ("sdpa", "longctx_flex")

# The step of each path: our trainer's, TRL 1.16's default, ours without offload, TRL before 1.16.
PATHS: dict[str, dict[str, Any]] = {
    "ours": {"offload_checkpoints": True, "logprob_path": "fused"},
    "trl": {"offload_checkpoints": False, "logprob_path": "trl"},
    "ours-no-offload": {"offload_checkpoints": False, "logprob_path": "fused"},
    "materialized": {"offload_checkpoints": False, "logprob_path": "materialized"},
}
PATH_LABELS = {
    "ours": "ours (offloaded checkpoints + selective_logprobs)",
    "trl": "TRL 1.16 default (fused_lm_head)",
    "ours-no-offload": "ours without checkpoint offload",
    "materialized": "materialized logits (TRL < 1.16)",
}
# Workspaces of the log-prob kernels: `longctx_kernels/ops/triton/selective_logprobs.py` (ROW_CHUNK, VOCAB_CHUNK,
# 128-wide logits tiles) and TRL 1.16's `trl/kernels/chunked_logprob.py` (TOKEN_CHUNK_SIZE x
# `trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`).
TRITON_ROW_CHUNK, TRITON_VOCAB_CHUNK, TRITON_BLOCK_V = 1024, 16384, 128
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768
# `longctx_kernels.default_chunk_size`: largest power-of-two token chunk with at most 256 MiB of fp32 logits.
DEFAULT_LOGIT_CHUNK_BYTES = 256 * 2**20
TORCH_BACKEND_BYTES_PER_CHUNK_LOGIT = 12
MATERIALIZED_BYTES_PER_LOGIT = 8

# Fitted against measured peaks (module docstring, "Fitted"); refit, never edit, when a formula changes.
ACTIVATION_SCALE = 1.0059
# Assumed, not fitted: the caching allocator's reserve above the allocated peak, and the CUDA context with cuBLAS
# workspaces, which `max_memory_allocated` does not count but the GPU's memory does.
FRAGMENTATION = 0.05
CUDA_CONTEXT_GIB = 0.75
# Tiled MLPs (`tile_mlps`) use tiles of at least this many tokens: smaller tiles run the matmuls inefficiently
# (their fixed costs stay while the matmuls get thinner).
MIN_TILE_TOKENS = 8192


@dataclass(frozen=True)
class TrainSetup:
    """What one training step runs; the fields mirror `LongContextGRPOConfig` and the peft config.

    Args:
        num_generations: Sequences per step on the device (`B`).
        prompt_length, completion_length: Tokens per sequence (`P`, `L`; padded lengths).
        mode: `"lora"`, `"qlora"` or `"full"`.
        lora_rank: LoRA rank, adapters on every linear layer of the decoder.
        offload_checkpoints: Checkpointed layer inputs held in host memory (`CheckpointOffloader`).
        logprob_path: `"fused"` (`longctx_kernels.selective_logprobs`), `"trl"` (TRL 1.16's default fused lm_head)
            or `"materialized"` (full `[B, L, V]` logits, TRL before 1.16).
        logit_chunk_tokens: Tokens per chunk of the torch backend; `None` = `longctx_kernels.default_chunk_size`.
        grpo_mini_batch: Sequences per decoder pass (`m`); `None` = all `B`.
        logprob_backend: `"triton"` (CUDA default) or `"torch"` (chunked) backend of `selective_logprobs`.
        tiled_mlp_chunks: Tiles of each decoder MLP or experts call (`trl_longctx.memory.tile_mlps`); 1 = untiled.
        lora_experts: MoE models: adapters also on both expert weights of every MoE layer (PEFT
            `target_parameters`); not with `mode="full"`.
        router_aux_loss: MoE models: the router load-balancing aux loss is computed (TRL turns it on when the model
            config's `router_aux_loss_coef`, or the trainer's, is non-zero), so the router logits of every MoE layer
            are kept for its backward.
        vision_patches: Patches each sequence's images feed the vision tower (`pixel_values` rows); 0 = no images.
            The image tokens are already part of `prompt_length`.
        vision_trained: Whether the vision tower takes gradients (then it keeps `vision_saved_bytes_per_patch`).
        attention: `"sdpa"` or `"longctx_flex"` (`trl_longctx.attention`, with attention sinks); see `ATTENTIONS`.
        lora_dropout: Whether the adapters apply dropout (`lora_dropout > 0`); not with `mode="full"`.
        nf4_nested_scales: QLoRA: the trainer's 4-bit weights keep bitsandbytes' nested (8-bit) block scales
            (`bnb_4bit_use_double_quant=True`, TRL's `use_bnb_nested_quant`); weights shared with vLLM never do.
    """

    num_generations: int
    prompt_length: int
    completion_length: int
    mode: str = "lora"
    lora_rank: int = 32
    offload_checkpoints: bool = True
    logprob_path: str = "fused"
    logit_chunk_tokens: int | None = None
    grpo_mini_batch: int | None = None
    logprob_backend: str = "triton"
    tiled_mlp_chunks: int = 1
    lora_experts: bool = False
    router_aux_loss: bool = True
    vision_patches: int = 0
    vision_trained: bool = False
    attention: str = "sdpa"
    lora_dropout: bool = False
    nf4_nested_scales: bool = False

    def __post_init__(self):
        for name in ("num_generations", "prompt_length", "completion_length", "lora_rank", "tiled_mlp_chunks"):
            _check_int(name, getattr(self, name), 0 if name == "prompt_length" else 1)
        _check_int("vision_patches", self.vision_patches, 0)
        for name in ("logit_chunk_tokens", "grpo_mini_batch"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.grpo_mini_batch is not None and self.grpo_mini_batch > self.num_generations:
            raise ValueError(f"grpo_mini_batch must be <= num_generations, got {self.grpo_mini_batch}.")
        for name, allowed in (
            ("mode", MODES),
            ("logprob_path", LOGPROB_PATHS),
            ("logprob_backend", LOGPROB_BACKENDS),
            ("attention", ATTENTIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        for name in ("lora_experts", "lora_dropout"):
            if getattr(self, name) and self.mode == "full":
                raise ValueError(f"{name} must be False with mode='full' (no adapters), got True.")
        if self.nf4_nested_scales and self.mode != "qlora":
            raise ValueError(f"nf4_nested_scales must be False with mode={self.mode!r} (no 4-bit weights), got True.")

    @classmethod
    def for_path(cls, path: str, num_generations: int, prompt_length: int, completion_length: int, **kw):
        """The setup of a named path (`PATHS`: "ours", "trl", "ours-no-offload", "materialized")."""
        if path not in PATHS:
            raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}.")
        return cls(num_generations, prompt_length, completion_length, **{**PATHS[path], **kw})

    def mini_batches(self) -> list[int]:
        """Sequences of each decoder pass, in forward order (the last one is back-propagated first)."""
        m = self.grpo_mini_batch or self.num_generations
        full, rest = divmod(self.num_generations, m)
        return [m] * full + ([rest] if rest else [])


@dataclass
class MemoryPlan:
    """Predicted bytes by component at the peak; `allocated` is what `torch.cuda.max_memory_allocated` should show.

    `phase` names where the peak is ("layer recompute" or "log-prob step"); `phases` holds both phases' totals.
    """

    components: dict[str, float] = field(default_factory=dict)
    phase: str = ""
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def allocated(self) -> float:
        return sum(self.components.values())

    @property
    def slack(self) -> float:
        """Allocator fragmentation and CUDA context: needed on the GPU, not counted as allocated."""
        return FRAGMENTATION * self.allocated + CUDA_CONTEXT_GIB * GIB

    @property
    def total(self) -> float:
        """Bytes the GPU must have."""
        return self.allocated + self.slack

    def rows_gib(self) -> list[tuple[str, float]]:
        rows = [(name, value / GIB) for name, value in self.components.items()]
        return rows + [("peak allocated", self.allocated / GIB), ("fragmentation + CUDA context", self.slack / GIB),
                       ("total", self.total / GIB)]  # fmt: skip


def layer_recompute_bytes_per_token(
    shape: ModelShape, mode: str = "lora", tiles: int = 1, lora_experts: bool = False, attention: str = "sdpa"
) -> dict[str, float]:
    """Bytes per token alive at the peak of one decoder layer's backward, by kind (formulas: module docstring): of a
    dense layer (`dense_layer_bytes_per_token`), or for an MoE model of its MoE layer (`moe_layer_bytes_per_token`),
    or of its dense layer where it has some and that holds more."""
    dense = dense_layer_bytes_per_token(shape, mode, tiles, attention)
    if not shape.moe_layers:
        return dense
    moe = moe_layer_bytes_per_token(shape, mode, tiles, lora_experts, attention)
    return dense if shape.dense_layers and sum(dense.values()) > sum(moe.values()) else moe


def dense_layer_bytes_per_token(
    shape: ModelShape, mode: str = "lora", tiles: int = 1, attention: str = "sdpa"
) -> dict[str, float]:
    """Bytes per token alive at the peak of one dense decoder layer's backward, by kind (formulas: module docstring).

    LoRA (fp32 adapters): the peak is the down adapter's input cast (`[N, I]` to fp32, then back to bf16 by
    autocast), the last op of the recompute. QLoRA (TRL casts its adapters to bf16, so nothing is cast) and full
    fine-tuning save the q/k/v input and the MLP product themselves; their peak is the backward of the product:
    saved tensors and three `[N, I]` gradients (of the product, of silu(gate) and of up).

    With the MLP in `tiles` tiles (`tile_mlps`), everything the MLP holds per token (its `[N, I]` tensors and the
    gate/up adapter inputs) is held for one tile at a time: those terms are divided by `tiles`; the tiles' outputs,
    kept until they are concatenated, add one `[N, H]` bf16 tensor.

    With `attention="longctx_flex"` the attention saves `6 * heads` bytes more per token (the sink factor); every
    term stays per token: no term grows with `T` beyond the token count.

    Returns:
        `{"saved for backward", "forward values", "adapter cast", "gradients"}`, bytes per token.
    """
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_size, shape.kv_size
    saved = FP32 * h + FP32 * h  # input and post-attention RMSNorm: fp32 upcast of the input
    saved += BF16 * (2 * q + 2 * kv) + FP32 * shape.num_attention_heads  # SDPA's q, k, v, output; logsumexp
    if attention == "longctx_flex":
        saved += (FP32 + BF16) * shape.num_attention_heads  # sigmoid(lse - sink): its fp32 output, its bf16 cast
    if shape.qk_norm:
        saved += FP32 * (q + kv)  # q_norm and k_norm: fp32 upcasts
    mlp_saved = BF16 * 3 * i  # gate (SiLU's input), up and silu(gate) (the product's inputs)
    tile_outputs = BF16 * h if tiles > 1 else 0
    if mode != "lora":
        # The q/k/v input and the product, saved by the linears (or bf16 adapters) that read them.
        saved += BF16 * h + (mlp_saved + BF16 * i) / tiles
        return {"saved for backward": saved, "forward values": tile_outputs, "adapter cast": 0,
                "gradients": BF16 * h + 3 * BF16 * i / tiles}  # fmt: skip
    saved += BF16 * (3 * h + q) + (mlp_saved + BF16 * 2 * h) / tiles  # bf16 copies of the adapter inputs
    live = BF16 * h + BF16 * h + BF16 * i / tiles + BF16 * h + tile_outputs  # residual, MLP input, product, down out
    return {"saved for backward": saved, "forward values": live, "adapter cast": (FP32 + BF16) * i / tiles,
            "gradients": 2 * BF16 * h}  # fmt: skip


# Bytes per element of a dropout mask saved for the backward: CUDA's fused dropout keeps a bool mask. (torch's CPU
# dropout multiplies by a noise tensor of the input's dtype and keeps that.)
DROPOUT_MASK_BYTES = 1


def lora_dropout_bytes_per_token(
    shape: ModelShape, mode: str = "lora", tiles: int = 1, mask_bytes: int = DROPOUT_MASK_BYTES
) -> float:
    """Bytes per token that adapter dropout adds to one decoder layer's recompute peak (module docstring, "LoRA
    dropout"). Each adapter's dropout keeps its mask (`mask_bytes` per input element). With bf16 adapters (QLoRA)
    `lora_A` saves the dropout's output instead of the input it shares with its neighbours, which nothing else keeps
    (the frozen base layers save no input): per token `m H` (q), `(2 + m) 2H` (k, v), `(2 + m) q` (o, whose input
    attention keeps anyway), `m H` (gate), `(2 + m) H` (up), `m I` (down), `m = mask_bytes`. With fp32 adapters (LoRA)
    each adapter already saves its own cast copy, which the dropout's output replaces: the masks, `m (3H + q + 2H + I)`,
    and the down adapter's fp32 dropout output `4I` at the cast. MLP terms per tile, as in
    `dense_layer_bytes_per_token`; MoE models count their attention's adapters only (the expert block has no input
    adapters)."""
    if mode == "full":
        return 0.0
    h, i, q, m = shape.hidden_size, shape.intermediate_size, shape.q_size, mask_bytes
    if mode == "qlora":
        attention = m * h + (BF16 + m) * (2 * h + q)
        mlp = m * h + (BF16 + m) * h + m * i
    else:
        attention = m * (3 * h + q)
        mlp = m * (2 * h + i) + FP32 * i
    if shape.moe_layers:
        return float(attention)
    return attention + mlp / tiles


def checkpoint_inputs_on_gpu(shape: ModelShape, mode: str, offload: bool) -> tuple[int, int]:
    """Layer inputs `[N, H]` of one mini-batch on the GPU: `(at the recompute peak, while waiting for backward)`.

    Without offload all `layers` inputs stay. With `CheckpointOffloader`, at the peak (layer 1): the input being
    recomputed from, layer 0's prefetched, and, with PEFT, the embedding output itself: `enable_input_require_grads`
    (which TRL calls for PEFT with gradient checkpointing) makes it an autograd leaf that the graph keeps alive,
    so its offloaded copy frees nothing. A mini-batch waiting for its backward keeps its last layer's input (and
    that leaf).
    """
    layers = shape.num_hidden_layers
    if not offload:
        return layers, layers
    leaf = 1 if mode != "full" and layers > 1 else 0
    return (2 if layers > 2 else 1) + leaf, 1 + leaf


def final_norm_backward_bytes_per_token(shape: ModelShape) -> int:
    """The final RMSNorm's backward: its saved fp32 input and five fp32 `[N, H]` temporaries (grad of the fp32 input
    through `x * rsqrt`, the mean's expanded grad, and `pow`'s three)."""
    return 6 * FP32 * shape.hidden_size


def _logprob_saved_bytes(shape: ModelShape, setup: TrainSetup, m: int) -> float:
    """What one not-yet-back-propagated mini-batch keeps for its log-prob backward (besides the final norm's input)."""
    h, predicted = shape.hidden_size, m * setup.completion_length
    tokens = m * (setup.prompt_length + setup.completion_length)
    if setup.logprob_path == "fused":
        # The hidden rows (a view of the whole last hidden state when m == 1: the slice is then contiguous) and the
        # gradient stored in the forward (frozen lm_head).
        rows = tokens if m == 1 else predicted
        return BF16 * h * (rows + predicted)
    if setup.logprob_path == "trl":
        return BF16 * h * predicted  # `hidden_states[mask]`
    return MATERIALIZED_BYTES_PER_LOGIT / 2 * predicted * shape.vocab_size  # bf16 logits kept for the backward


def _logprob_step_bytes(shape: ModelShape, setup: TrainSetup, m: int) -> dict[str, float]:
    """Phase B of one mini-batch of `m` sequences: per-token activations and fixed workspaces, by name."""
    h, v = shape.hidden_size, shape.vocab_size
    tokens = m * (setup.prompt_length + setup.completion_length)
    predicted = m * setup.completion_length
    around = FP32 * h * tokens + BF16 * h * tokens  # final norm's saved input + the last hidden state
    if setup.logprob_path == "fused":
        rows = 0 if m == 1 else predicted
        activations = around + BF16 * h * (rows + predicted) + 5 * FP32 * predicted
        if setup.logprob_backend == "triton":
            # One [rows, vocab] bf16 tile, a [rows, H] fp32 accumulator and per-tile statistics (fp32, 128 wide).
            tile_rows = min(TRITON_ROW_CHUNK, predicted)
            tile_cols = min(TRITON_VOCAB_CHUNK, -(-v // TRITON_BLOCK_V) * TRITON_BLOCK_V)
            workspace = BF16 * tile_rows * tile_cols + FP32 * tile_rows * (h + 4 * tile_cols // TRITON_BLOCK_V)
        else:
            chunk = min(setup.logit_chunk_tokens or default_logit_chunk_tokens(v), predicted)
            workspace = TORCH_BACKEND_BYTES_PER_CHUNK_LOGIT * chunk * v
    elif setup.logprob_path == "trl":
        activations = FP32 * h * tokens + BF16 * h * predicted * 4 + 7 * FP32 * predicted
        workspace = BF16 * min(predicted, TRL_TOKEN_CHUNK) * TRL_VOCAB_CHUNK  # its tile is 32768 wide whatever V
    else:
        activations = around + MATERIALIZED_BYTES_PER_LOGIT * predicted * v
        workspace = 0
    norm_backward = final_norm_backward_bytes_per_token(shape) * tokens
    if norm_backward > activations + workspace:
        return {"final norm backward": norm_backward}
    name = {"fused": "selective_logprobs", "trl": "TRL fused lm_head", "materialized": "materialized logits"}
    return {f"log-prob step ({name[setup.logprob_path]})": activations, "log-prob kernel workspace": workspace}


def default_logit_chunk_tokens(vocab_size: int, budget_bytes: int = DEFAULT_LOGIT_CHUNK_BYTES) -> int:
    """`longctx_kernels.default_chunk_size` without importing torch: the largest power-of-two token chunk whose fp32
    logits fit in `budget_bytes` (1 when even one row does not)."""
    rows = budget_bytes // (vocab_size * FP32)
    return 1 << (rows.bit_length() - 1) if rows >= 1 else 1


def _static_bytes(shape: ModelShape, setup: TrainSetup, layers_done: int) -> dict[str, float]:
    # MoE experts and routers are bf16 in every mode: bitsandbytes quantizes `nn.Linear` layers only.
    linear, other = shape.linear_params(), shape.other_params() + shape.moe_params()
    if setup.mode == "full":
        # bf16 weights and grads, AdamW's two moments in the parameters' dtype (torch's default).
        return {"weights + grads + AdamW (bf16)": (linear + other) * 4 * BF16}
    lora = shape.lora_params(setup.lora_rank, setup.lora_experts)
    if setup.vision_trained and shape.vision is not None:
        lora += shape.vision.lora_params(setup.lora_rank)  # "all-linear" adapts the tower's linear layers too
    done = lora * layers_done // shape.num_hidden_layers
    if setup.mode == "qlora":
        # TRL casts QLoRA adapters to bf16; AdamW keeps its states in the parameters' dtype. bitsandbytes dequantizes
        # one weight at a time to bf16 for the matmul.
        shapes = shape.linear_shapes() if shape.dense_layers else shape.attention_shapes()
        dequantized = BF16 * max(a * b for a, b in shapes)
        nf4 = NF4_NESTED_BYTES_PER_PARAM if setup.nf4_nested_scales else NF4_BYTES_PER_PARAM
        return {"weights": linear * nf4 + other * BF16 + dequantized,
                "LoRA params + AdamW states": lora * 3 * BF16,
                "LoRA grads (layers done)": done * BF16}  # fmt: skip
    # PEFT upcasts the adapters of a bf16 model to fp32: parameter, two AdamW moments and gradient, 4 B each.
    return {
        "weights": (linear + other) * BF16,
        "LoRA params + AdamW states": lora * 3 * FP32,
        "LoRA grads (layers done)": done * FP32,
    }


def plan_memory(shape: ModelShape, setup: TrainSetup, *, activation_scale: float | None = None) -> MemoryPlan:
    """Predict the peak memory of one GRPO step, by component (bytes).

    Args:
        shape: The model's architecture numbers (`presets.PRESETS`, `presets.load_model_shape` or
            `ModelShape.from_config`).
        setup: Batch, lengths, training mode and switches.
        activation_scale: Factor on the per-token activation terms; `None` = the fitted `ACTIVATION_SCALE`.

    Returns:
        A `MemoryPlan`; `plan.allocated` is the predicted `torch.cuda.max_memory_allocated` of the step.

    Example:
        >>> from trl_longctx.memory import PRESETS, TrainSetup, plan_memory
        >>> plan = plan_memory(PRESETS["qwen3-8b"], TrainSetup.for_path("ours", 2, 256, 32768))
        >>> print(f"{plan.allocated / 2**30:.1f} GiB")
        38.9 GiB
    """
    if setup.lora_experts and not shape.num_experts:
        raise ValueError("lora_experts must be False for a model without experts (num_experts=0), got True.")
    scale = ACTIVATION_SCALE if activation_scale is None else activation_scale
    best: MemoryPlan | None = None
    phases: dict[str, float] = {}
    batches = setup.mini_batches()
    for j in range(len(batches)):
        for phase, components in _phases(shape, setup, batches, j, scale).items():
            components = {name: float(value) for name, value in components.items() if value}
            phases[f"{phase}, mini-batch {j}"] = sum(components.values())
            if best is None or phases[f"{phase}, mini-batch {j}"] > best.allocated:
                best = MemoryPlan(components, phase)
    best.phases = phases
    return best


def _phases(shape: ModelShape, setup: TrainSetup, batches: list[int], j: int, scale: float) -> dict[str, dict]:
    """Both phases' components while mini-batch `j` is back-propagated (after `j + 1 ..`, before `0 .. j - 1`)."""
    h, layers = shape.hidden_size, shape.num_hidden_layers
    seq = setup.prompt_length + setup.completion_length
    m, before, offload = batches[j], batches[:j], setup.offload_checkpoints
    tokens = m * seq
    # Earlier mini-batches keep all their layer inputs, or with offload their last layer's; their final norm's
    # input and their log-prob kernel's saved tensors.
    inputs_before = BF16 * h * seq * sum(before) * checkpoint_inputs_on_gpu(shape, setup.mode, offload)[1]
    waiting = sum(FP32 * h * b * seq + _logprob_saved_bytes(shape, setup, b) for b in before)
    shared = {"other mini-batches' saved tensors": scale * waiting,
              "rotary tables": (j + 1) * 2 * seq * shape.head_dim * BF16,
              "vision tower saved tensors": _vision_bytes(shape, setup, m + sum(before))}  # fmt: skip
    if setup.router_aux_loss:
        # The aux loss of mini-batches 0 .. j is back-propagated after mini-batch j's decoder (autograd runs the
        # nodes made last first), so their router softmaxes are still held.
        shared["router logits kept for the aux loss"] = (
            scale * router_logits_bytes_per_token(shape) * seq * (sum(before) + m)
        )
    current_inputs, waiting_inputs = checkpoint_inputs_on_gpu(shape, setup.mode, offload)
    # With offload the recompute peak is at layer 1 (layers 2.. are done); without, at the top layer. Once a later
    # mini-batch has been back-propagated, every layer has its gradient.
    done_before = layers if j < len(batches) - 1 else 0
    layers_done = max(done_before, layers - 2 if offload and layers >= 3 else 0)
    per_token = layer_recompute_bytes_per_token(
        shape, setup.mode, setup.tiled_mlp_chunks, setup.lora_experts, setup.attention
    )
    a = {
        **_static_bytes(shape, setup, layers_done),
        "checkpointed layer inputs on GPU": BF16 * h * tokens * current_inputs + inputs_before,
        "recompute working set (1 layer)": scale * sum(per_token.values()) * tokens,
        "LoRA dropout masks and outputs (1 layer)": (
            scale * lora_dropout_bytes_per_token(shape, setup.mode, setup.tiled_mlp_chunks) * tokens
            if setup.lora_dropout
            else 0
        ),
        "adapted expert weights (LoRA on experts)": adapted_expert_bytes(shape) if setup.lora_experts else 0,
        **shared,
    }
    b = {
        **_static_bytes(shape, setup, done_before),
        "checkpointed layer inputs on GPU": BF16 * h * tokens * waiting_inputs + inputs_before,
    }
    for name, value in _logprob_step_bytes(shape, setup, m).items():
        b[name] = value if "workspace" in name else scale * value
    return {"layer recompute": a, "log-prob step": {**b, **shared}}


def _vision_bytes(shape: ModelShape, setup: TrainSetup, sequences: int) -> float:
    """What the vision tower keeps for the backward of `sequences` sequences' images (0 when it is frozen)."""
    if not (setup.vision_patches and setup.vision_trained):
        return 0
    if shape.vision is None:
        raise ValueError(
            f"vision_patches={setup.vision_patches} with vision_trained=True, but the model shape has no vision tower "
            "(ModelShape.vision is None): build it from the vision-language model's config."
        )
    return vision_saved_bytes_per_patch(shape.vision) * setup.vision_patches * sequences


def pinned_host_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    """Host memory `CheckpointOffloader` pins for one step: every offloaded layer input of every mini-batch (the
    whole batch runs forward before the backward), `layers - 1` per sequence (the last stays on the GPU), `T * 2H`
    bytes each (the pool's 2 MiB rounding aside). 0 without offload."""
    if not setup.offload_checkpoints or shape.num_hidden_layers < 2:
        return 0
    seq = setup.prompt_length + setup.completion_length
    return (shape.num_hidden_layers - 1) * setup.num_generations * seq * BF16 * shape.hidden_size


def mlp_tile_counts(tokens: int) -> list[int]:
    """MLP tile counts worth trying for a decoder pass of `tokens` flattened tokens, fewest first: 1 (untiled), then
    2, 3, ... while each tile keeps at least `MIN_TILE_TOKENS` tokens."""
    return [1, *range(2, tokens // MIN_TILE_TOKENS + 1)]


def fewest_mlp_tiles(shape: ModelShape, setup: TrainSetup, budget_bytes: float) -> int | None:
    """The fewest MLP tiles (`mlp_tile_counts`) whose predicted total fits in `budget_bytes`; None if none does."""
    tokens = setup.mini_batches()[0] * (setup.prompt_length + setup.completion_length)
    for tiles in mlp_tile_counts(tokens):
        if plan_memory(shape, replace(setup, tiled_mlp_chunks=tiles)).total <= budget_bytes:
            return tiles
    return None


def longest_completion(
    shape: ModelShape,
    setup: TrainSetup,
    gpu_memory_gib: float,
    multiple: int = 256,
    *,
    tile_mlps: bool = False,
    host_memory_gib: float | None = None,
) -> int:
    """The longest completion (a multiple of `multiple` tokens) whose predicted total fits in `gpu_memory_gib`.

    Args:
        tile_mlps: Let each length use the fewest MLP tiles that fit (as `LongContextGRPOTrainer` does on CUDA with
            `tiled_mlp_chunks=None`); otherwise `setup.tiled_mlp_chunks` for every length.
        host_memory_gib: Host memory the offloaded checkpoints may pin (`pinned_host_bytes`); `None` = unlimited.

    Returns:
        The length in tokens; 0 when not even `multiple` tokens fit.
    """

    def fits(length: int) -> bool:
        at = replace(setup, completion_length=length * multiple)
        if host_memory_gib is not None and pinned_host_bytes(shape, at) > host_memory_gib * GIB:
            return False
        if tile_mlps:
            return fewest_mlp_tiles(shape, at, gpu_memory_gib * GIB) is not None
        return plan_memory(shape, at).total <= gpu_memory_gib * GIB

    # Every component grows monotonically with the length.
    return largest_fitting(fits, 2**24) * multiple


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest `n` in `1..limit` with `fits(n)`, for a `fits` that holds up to some `n` and not beyond (doubling,
    then bisecting); 0 when `fits(1)` fails."""
    if not fits(1):
        return 0
    high = 2
    while high < limit and fits(high):
        high *= 2
    if high >= limit and fits(limit):
        return limit
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


class ChunkSizes(NamedTuple):
    """Chunk sizes of the log-prob pass: `grpo_mini_batch` sequences per decoder pass, `logit_chunk_tokens` tokens per
    chunk of float32 logits (the torch backend's `chunk_size`; `None` where the Triton backend runs: it tiles on its
    own, in fixed tiles), `tiled_mlp_chunks` tiles per decoder MLP call (1: untiled). The one vocabulary of sizes of
    the planner, the log-prob pass (`trl_longctx.logprob_pass`) and its out-of-memory retry."""

    grpo_mini_batch: int
    logit_chunk_tokens: int | None
    tiled_mlp_chunks: int = 1

    def describe(self) -> str:
        chunk = (
            "the Triton kernel's own tiles" if self.logit_chunk_tokens is None else f"{self.logit_chunk_tokens} tokens"
        )
        return f"grpo_mini_batch={self.grpo_mini_batch}, logit chunk {chunk}, tiled_mlp_chunks={self.tiled_mlp_chunks}"


def auto_chunk_sizes(
    model_config: ModelShape | Mapping[str, Any] | Any,
    free_bytes: float,
    num_sequences: int,
    prompt_len: int,
    completion_len: int,
    *,
    mode: str = "lora",
    lora_rank: int = 32,
    offload_checkpoints: bool = True,
    logprob_backend: str = "triton",
    margin: float = 0.10,
    optimizer_states_allocated: bool = False,
    max_logit_chunk_tokens: int | None = None,
    tile_mlps: bool = False,
    grpo_mini_batch: int | None = None,
    vision_patches: int = 0,
    vision_trained: bool = False,
    attention: str = "sdpa",
    lora_experts: bool = False,
    router_aux_loss: bool = True,
    lora_dropout: bool = False,
) -> ChunkSizes:
    """The largest mini-batch and logit chunk (and, with `tile_mlps`, the fewest MLP tiles) whose predicted step fits
    in `free_bytes` with a `margin`.

    What must fit is the predicted peak (`plan_memory`) minus what is resident when `free_bytes` is read: the weights
    and the LoRA parameters, and the AdamW states once `optimizer_states_allocated` (after the first optimizer step).
    It fits when `(peak - resident) * (1 + margin) <= free_bytes`. The default margin of 10% is the planner's accuracy
    bound (measured rows within 3%, asserted within 10%) and also covers allocator fragmentation.

    The mini-batch is the largest divisor of `num_sequences` that fits with the full chunk (`max_logit_chunk_tokens`,
    default `longctx_kernels.default_chunk_size`: 256 MiB of fp32 logits); the chunk is then the largest power of two
    up to that cap that fits. The chunk shrinks only at mini-batch 1, so both sizes grow monotonically with
    `free_bytes`. With `tile_mlps`, when no mini-batch fits untiled, the fewest MLP tiles (`mlp_tile_counts`) that
    fit are taken, with the largest mini-batch that fits with them: each tile costs compute, a smaller mini-batch
    does not. The chunk then shrinks at mini-batch 1 with the most tiles. When nothing fits, `(1, 1, most tiles)`
    is returned with a warning: sizes are never 0.

    Args:
        model_config: A `ModelShape`, a transformers config or a `config.json` dict.
        free_bytes: Device bytes the step may still allocate, read with the model on the device, e.g.
            `torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()`.
        num_sequences: Sequences per step on the device (`B`).
        prompt_len, completion_len: Padded token lengths.
        mode, lora_rank, offload_checkpoints, logprob_backend: As in `TrainSetup`.
        margin: Fraction of the predicted need kept free, >= 0.
        optimizer_states_allocated: Whether AdamW's states already exist (then they are resident, not needed).
        max_logit_chunk_tokens: Cap of the chunk; `None` = `default_logit_chunk_tokens(vocab_size)`.
        tile_mlps: Whether MLP tiles may be chosen (otherwise `tiled_mlp_chunks` is 1).
        grpo_mini_batch: A mini-batch fixed by the user (a divisor of `num_sequences`); `None` = chosen here.
        vision_patches, vision_trained: As in `TrainSetup` (the images of a vision-language model).
        attention: As in `TrainSetup`.
        lora_experts, router_aux_loss: As in `TrainSetup` (MoE models).
        lora_dropout: As in `TrainSetup`.

    Returns:
        `ChunkSizes(grpo_mini_batch, logit_chunk_tokens, tiled_mlp_chunks)`, all `>= 1`; the mini-batch divides
        `num_sequences`.

    Example:
        >>> from trl_longctx.memory.planner import auto_chunk_sizes
        >>> auto_chunk_sizes(PRESETS["qwen3-8b"], 40 * 2**30, 8, 256, 16384)
        ChunkSizes(grpo_mini_batch=4, logit_chunk_tokens=256)
    """
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}.")
    cap = max_logit_chunk_tokens or default_logit_chunk_tokens(shape.vocab_size)
    _check_int("max_logit_chunk_tokens", cap, 1)
    base = TrainSetup(num_sequences, prompt_len, completion_len, mode=mode, lora_rank=lora_rank,
                      offload_checkpoints=offload_checkpoints, logprob_backend=logprob_backend,
                      vision_patches=vision_patches, vision_trained=vision_trained, attention=attention,
                      lora_experts=lora_experts, router_aux_loss=router_aux_loss,
                      lora_dropout=lora_dropout)  # fmt: skip
    resident = _resident_bytes(shape, base, optimizer_states_allocated)

    def fits(mini_batch: int, chunk: int, tiles: int = 1) -> bool:
        setup = replace(base, grpo_mini_batch=mini_batch, logit_chunk_tokens=chunk, tiled_mlp_chunks=tiles)
        return (plan_memory(shape, setup).allocated - resident) * (1 + margin) <= free_bytes

    def tile_counts(mini_batch: int) -> list[int]:
        return mlp_tile_counts(mini_batch * (prompt_len + completion_len))[1:] if tile_mlps else []

    mini_batches = sorted((d for d in range(1, num_sequences + 1) if num_sequences % d == 0), reverse=True)
    if grpo_mini_batch is not None:
        _check_int("grpo_mini_batch", grpo_mini_batch, 1)
        mini_batches = [min(grpo_mini_batch, num_sequences)]
    for mini_batch in mini_batches:
        if fits(mini_batch, cap):
            return ChunkSizes(mini_batch, cap)
    # Fewest tiles first (each tile costs compute, a smaller mini-batch does not), then the largest mini-batch.
    for tiles, mini_batch in sorted((t, -m) for m in mini_batches for t in tile_counts(m)):
        if fits(-mini_batch, cap, tiles):
            return ChunkSizes(-mini_batch, cap, tiles)
    smallest = mini_batches[-1]
    most_tiles = max([1, *tile_counts(smallest)])
    chunk = 1 << (cap.bit_length() - 1)  # powers of two below the cap
    while chunk >= 1:
        if fits(smallest, chunk, most_tiles):
            return ChunkSizes(smallest, chunk, most_tiles)
        chunk //= 2
    warnings.warn(
        f"No chunk sizes fit: {num_sequences} x ({prompt_len} + {completion_len}) tokens need more than "
        f"{free_bytes / GIB:.1f} GiB free even {smallest} sequence(s) at a time; using grpo_mini_batch={smallest}, "
        f"logit chunk 1, {most_tiles} MLP tiles.",
        stacklevel=2,
    )
    return ChunkSizes(smallest, 1, most_tiles)


def trainable_state_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    """The adapters' parameters and AdamW states on the device (`mode` "lora" or "qlora"): what the trainer keeps
    beside the shared weights while vLLM decodes a rollout."""
    if setup.mode == "full":
        raise ValueError("trainable_state_bytes counts adapters: mode must be 'lora' or 'qlora', got 'full'.")
    return _static_bytes(shape, setup, 0)["LoRA params + AdamW states"]


def _resident_bytes(shape: ModelShape, setup: TrainSetup, optimizer_states_allocated: bool) -> float:
    """Weights and trainable parameters on the device before the step (AdamW states once allocated)."""
    static = _static_bytes(shape, setup, 0)
    if setup.mode == "full":
        weights = static["weights + grads + AdamW (bf16)"]
        return weights / 2 if optimizer_states_allocated else weights / 4
    lora = static["LoRA params + AdamW states"]
    return static["weights"] + (lora if optimizer_states_allocated else lora / 3)

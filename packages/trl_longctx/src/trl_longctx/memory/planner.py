"""Predict the peak GPU memory of one GRPO training step, by component, and the longest completion that fits.

Plain Python, no torch: `longctx-grpo plan` answers before anything heavy is imported.

The step, as `LongContextGRPOTrainer` runs it with gradient checkpointing: the decoder runs forward over `B`
sequences of `T = prompt + completion` tokens, keeping one checkpointed input `[B, T, H]` per layer; the log-probs of
the `B * completion` predicted tokens come from the lm_head; the backward then recomputes one layer at a time. The
peak is at the start of that backward, where the following are alive together (bytes, bf16 = 2 per element):

- weights: the frozen base (bf16; 4-bit NF4 linears for QLoRA) plus, for full fine-tuning, grads and AdamW states;
- trainable LoRA parameters with their grads and AdamW states (PEFT keeps adapters in fp32: 4 + 4 + 8 = 16 bytes);
- checkpointed layer inputs: `layers * B * T * H * 2`, or 2 layers' worth when offloaded (the last layer's input
  kept on the GPU, and the one being prefetched);
- the recompute working set of one decoder layer: everything its forward saves for the backward plus the gradients
  in flight (per token, see `_layer_bytes_per_token`);
- the hidden states the log-prob backward needs, and the final norm's saved activations;
- the log-prob chunk: float32 logits of one chunk (fused path), or the whole materialized logits (TRL's path);
- allocator slack: the caching allocator reserves more than it hands out, and the CUDA context takes its share.

The components are added: they were measured to coexist (../shared/GPU.md: TRL's step peak exceeds the fused
path's by 5.45 bytes per logit at every length, on top of an unchanged decoder backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
MODES = ("lora", "qlora", "full")
LOGPROB_PATHS = ("fused", "materialized")
BF16 = 2
FP32 = 4
# NF4 with double quantization (bitsandbytes): 4 bits per weight plus ~0.127 bits of block scales.
NF4_BYTES_PER_PARAM = 0.5 + 0.127 / 8
# TRL 1.16's materialized path (bf16 logits, temperature-scaled copy, fp32 log-softmax rows, bf16 logit grads):
# measured peak growth per logit on the lent H200 (../shared/GPU.md: 5.35-5.49 bytes between 4K and 32K tokens).
MATERIALIZED_BYTES_PER_LOGIT = 5.5
# `longctx_kernels.default_chunk_size`: 256 MiB of float32 logits per chunk.
LOGIT_CHUNK_BYTES = 256 * 2**20
# The allocator's reserve above the allocated peak (block rounding, fragmentation), and the CUDA context with
# cuBLAS workspaces, which `max_memory_allocated` does not count but the GPU's memory does.
ALLOCATOR_SLACK_FRACTION = 0.05
CUDA_CONTEXT_GIB = 0.75


@dataclass(frozen=True)
class ModelShape:
    """Architecture numbers of a decoder-only LM (the `config.json` fields of the same names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qk_norm: bool = False

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """`(in, out)` of the linear layers of one decoder layer (q, k, v, o, gate, up, down)."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, self.q_size), (h, self.kv_size), (h, self.kv_size), (self.q_size, h), (h, i), (h, i), (i, h)]

    def linear_params(self) -> int:
        return self.num_hidden_layers * sum(a * b for a, b in self.linear_shapes())

    def other_params(self) -> int:
        """Embeddings, lm_head and norms: kept in bf16 even with QLoRA."""
        heads = 1 if self.tie_word_embeddings else 2
        norms = self.num_hidden_layers * (2 * self.hidden_size + 2 * self.head_dim) + self.hidden_size
        return heads * self.vocab_size * self.hidden_size + norms


@dataclass(frozen=True)
class TrainSetup:
    """What one training step runs; the fields mirror `LongContextGRPOConfig` and the peft config.

    Args:
        num_generations: Sequences per step on the device (`B`; one group of generations per device).
        prompt_length, completion_length: Tokens per sequence (padded lengths).
        mode: `"lora"`, `"qlora"` or `"full"`.
        lora_rank: LoRA rank, adapters on every linear layer of the decoder.
        offload_checkpoints: Checkpointed layer inputs held in host memory (`CheckpointOffloader`).
        logprob_path: `"fused"` (`longctx_kernels.selective_logprobs`) or `"materialized"` (TRL's default).
        logit_chunk_tokens: Tokens per log-prob chunk; `None` = `longctx_kernels.default_chunk_size`.
    """

    num_generations: int
    prompt_length: int
    completion_length: int
    mode: str = "lora"
    lora_rank: int = 32
    offload_checkpoints: bool = True
    logprob_path: str = "fused"
    logit_chunk_tokens: int | None = None

    def __post_init__(self):
        for name in ("num_generations", "prompt_length", "completion_length", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "prompt_length" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}.")
        if self.logprob_path not in LOGPROB_PATHS:
            raise ValueError(f"logprob_path must be one of {list(LOGPROB_PATHS)}, got {self.logprob_path!r}.")


@dataclass
class MemoryPlan:
    """Predicted bytes by component; `allocated` is what `torch.cuda.max_memory_allocated` should show."""

    components: dict[str, float] = field(default_factory=dict)
    slack: float = 0.0

    @property
    def allocated(self) -> float:
        return sum(self.components.values())

    @property
    def total(self) -> float:
        """Bytes the GPU must have: the allocated peak plus allocator slack and CUDA context."""
        return self.allocated + self.slack

    def rows_gib(self) -> list[tuple[str, float]]:
        rows = [(name, value / GIB) for name, value in self.components.items()]
        return rows + [("peak allocated", self.allocated / GIB), ("allocator slack + CUDA context", self.slack / GIB),
                       ("total", self.total / GIB)]  # fmt: skip


def _layer_bytes_per_token(shape: ModelShape, mode: str) -> float:
    """Bytes per token that one decoder layer's recompute keeps for its backward, plus the gradients in flight.

    Per token, bf16 activations (H hidden, I intermediate, q = heads * head_dim, kv = kv_heads * head_dim):
      - each RMSNorm upcasts to fp32 and saves that (4H), its normalized bf16 value (2H) and output (2H): 8H, twice;
      - Qwen3's q/k norms do the same on q and k: 8 (q + kv);
      - rotary saves q and k (2 (q + kv)); SDPA saves q, k, v and its output (2 (2q + 2kv)), logsumexp negligible;
      - the MLP saves gate and up (2I each), silu(gate) (2I) and the product fed to down (2I): 8I;
      - LoRA casts each linear's input for its fp32 adapters and autocast keeps a bf16 copy for the matmul:
        2 x input per adapted linear (q, k, v, gate, up read H; o reads q; down reads I): 2 (5H + q + I);
      - gradients in flight at the MLP's backward: grads of gate, up and the product (3 x 2I) and of the
        layer output and input (2 x 2H).
    """
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_size, shape.kv_size
    saved = 2 * 8 * h + 2 * (q + kv) + 2 * (2 * q + 2 * kv) + 8 * i
    if shape.qk_norm:
        saved += 8 * (q + kv)
    if mode != "full":
        saved += 2 * (5 * h + q + i)
    in_flight = 3 * 2 * i + 2 * 2 * h
    return saved + in_flight


def plan_memory(shape: ModelShape, setup: TrainSetup) -> MemoryPlan:
    """Predict the peak memory of one GRPO step, by component (bytes).

    Args:
        shape: The model's architecture numbers (`presets.PRESETS` or `presets.load_model_shape`).
        setup: Batch, lengths, training mode and switches.

    Returns:
        A `MemoryPlan`; `plan.allocated` is the predicted `torch.cuda.max_memory_allocated` of the step.

    Example:
        >>> from trl_longctx.memory import PRESETS, TrainSetup, plan_memory
        >>> plan = plan_memory(PRESETS["qwen3-8b"], TrainSetup(2, 256, 32768))
        >>> print(f"{plan.total / 2**30:.0f} GiB")
    """
    h, v = shape.hidden_size, shape.vocab_size
    batch, completion = setup.num_generations, setup.completion_length
    tokens = batch * (setup.prompt_length + completion)
    predicted = batch * completion
    components: dict[str, float] = {}

    linear = shape.linear_params()
    if setup.mode == "qlora":
        components["weights"] = linear * NF4_BYTES_PER_PARAM + shape.other_params() * BF16
    elif setup.mode == "lora":
        components["weights"] = (linear + shape.other_params()) * BF16
    else:
        # bf16 weights and grads, AdamW's two moments kept in the parameters' dtype (torch's default).
        components["weights + grads + AdamW"] = (linear + shape.other_params()) * (BF16 + BF16 + 2 * BF16)
    if setup.mode != "full":
        lora = shape.num_hidden_layers * sum(setup.lora_rank * (a + b) for a, b in shape.linear_shapes())
        # fp32 adapters (PEFT upcasts them on bf16 models), fp32 grads, two fp32 AdamW moments.
        components["LoRA params + grads + AdamW"] = lora * (FP32 + FP32 + 2 * FP32)

    layers_on_gpu = min(2, shape.num_hidden_layers) if setup.offload_checkpoints else shape.num_hidden_layers
    components["checkpointed layer inputs"] = layers_on_gpu * tokens * h * BF16
    components["recompute working set (1 layer)"] = tokens * _layer_bytes_per_token(shape, setup.mode)
    # The final norm saves 8H per token like the others; the log-prob backward keeps the predicted positions'
    # hidden states (or their gradient, when the fused path computes it in the forward).
    components["final norm + log-prob hidden states"] = tokens * 8 * h + predicted * h * BF16
    if setup.logprob_path == "materialized":
        components["logits (materialized)"] = predicted * v * MATERIALIZED_BYTES_PER_LOGIT
    else:
        chunk = setup.logit_chunk_tokens or max(1, LOGIT_CHUNK_BYTES // (FP32 * v))
        # fp32 logits of one chunk and their softmax / gradient.
        components["log-prob chunk logits"] = min(chunk, predicted) * v * FP32 * 2
    plan = MemoryPlan(components)
    plan.slack = ALLOCATOR_SLACK_FRACTION * plan.allocated + CUDA_CONTEXT_GIB * GIB
    return plan


def longest_completion(shape: ModelShape, setup: TrainSetup, gpu_memory_gib: float, multiple: int = 256) -> int:
    """The longest completion (a multiple of `multiple` tokens) whose predicted total fits in `gpu_memory_gib`.

    Returns:
        The length in tokens; 0 when not even `multiple` tokens fit.
    """

    def fits(length: int) -> bool:
        trial = TrainSetup(**{**setup.__dict__, "completion_length": length * multiple})
        return plan_memory(shape, trial).total <= gpu_memory_gib * GIB

    if not fits(1):
        return 0
    # Every component grows monotonically with the length: double, then bisect.
    high = 2
    while fits(high) and high < 2**24:
        high *= 2
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * multiple

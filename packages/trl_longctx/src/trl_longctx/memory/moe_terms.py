"""The memory terms of Mixture-of-Experts layers: what an MoE layer holds at the peak of its recompute's backward.

Mixture-of-Experts models (`ModelShape.num_experts > 0`, transformers 5.17's `grouped_mm` experts path, PEFT 0.21):
experts and routers are bf16 weights in every mode (bitsandbytes quantizes `nn.Linear` layers only; a checkpoint's
MXFP4 experts are dequantized to train); LoRA adapters sit on every `nn.Linear` (attentions, dense MLPs; not the
routers) and, with `lora_experts`, on both expert weights (PEFT `target_parameters`), whose adapted copies each MoE
layer forms while it runs (`adapted_expert_bytes`). An MoE layer's recompute holds the attention half of a dense
layer plus its router's and experts' tensors (`moe_block_bytes_per_token`: `k` rows per token; one tile's with tiled
experts); with the router aux loss on, every MoE layer's router softmax `[N, E]` waits for the loss's backward
(`router_logits_bytes_per_token`). These terms are derived from the ops and checked against allocation traces of
tiny layers on CPU (`tests/memory/test_planner_moe.py`); no MoE step was measured on a GPU, and `ACTIVATION_SCALE`
was fitted on dense models.
"""

from __future__ import annotations

from .shapes import BF16, FP32, ModelShape


def moe_layer_bytes_per_token(
    shape: ModelShape, mode: str = "lora", tiles: int = 1, lora_experts: bool = False, attention: str = "sdpa"
) -> dict[str, float]:
    """Bytes per token alive at the peak of one MoE decoder layer's backward, by kind.

    The attention half is the dense layer's (`dense_layer_bytes_per_token`): norms, SDPA (and the sink factor with
    `attention="longctx_flex"`), the attention adapters' bf16 input copies (LoRA), or the q/k/v input (QLoRA, full). The MoE block has no adapter on its input (PEFT's
    "all-linear" finds no `nn.Linear` in it); it keeps the residual and its own input (read by the router, gathered by
    the experts), and the router's and experts' tensors of `moe_block_bytes_per_token`; the experts' share is one
    tile's with tiled experts. Gradients: the layer output's (and with LoRA its scaled copy), as in a dense layer.

    Returns:
        `{"saved for backward", "forward values", "router", "experts (saved)", "experts (dispatch)",
        "gradients"}`, bytes per token.
    """
    h, q, kv = shape.hidden_size, shape.q_size, shape.kv_size
    saved = FP32 * h + FP32 * h + BF16 * (2 * q + 2 * kv) + FP32 * shape.num_attention_heads
    if attention == "longctx_flex":
        saved += (FP32 + BF16) * shape.num_attention_heads  # the sink factor, as in a dense layer
    if shape.qk_norm:
        saved += FP32 * (q + kv)
    saved += BF16 * (3 * h + q) if mode == "lora" else BF16 * h  # adapter input copies, or the q/k/v input
    block = moe_block_bytes_per_token(shape, trained=mode == "full" or lora_experts, tiles=tiles)
    tile_outputs = BF16 * h if tiles > 1 else 0
    return {"saved for backward": saved, "forward values": 2 * BF16 * h + tile_outputs, **block,
            "gradients": (2 if mode == "lora" else 1) * BF16 * h}  # fmt: skip


def moe_block_bytes_per_token(shape: ModelShape, trained: bool = False, tiles: int = 1) -> dict[str, float]:
    """Bytes per token of an MoE block (router + experts) at the peak of its backward, by kind, in transformers
    5.17's `grouped_mm` experts path (`transformers.integrations.moe`), bf16 activations. `k` rows per token:
    `S = N * k` rows of `[S, H]` and `[S, I_e]` tensors.

    - router: its fp32 softmax over the experts `4E` (kept for the backward; gpt-oss's softmax over the top k keeps
      less) and the int64 top-k indices `8k`;
    - experts (saved): the expert outputs `2kH` (the routing-weight product's backward reads them), the gate/up
      output `2k * 2I_e` (the activation reads it), the activation's `expert_activation_tensors` `[S, I_e]`, and
      `k * 27` bytes of dispatch bookkeeping (three int64 row indices: the gather, the routing-weight order and its
      inverse; the bf16 routing weights; the bool sentinel mask). With `trained` experts (full fine-tuning, or LoRA
      on the experts) also the gathered inputs `2kH` and the activation product `2kI_e`, which the weight gradients
      read;
    - experts (dispatch): `[S, H]` tensors alive besides the saved ones at the peak: three (the end of the
      recompute holds the routing-weighted outputs and their reordering, and the gathered inputs where they are not
      saved; the routing-weight product's backward holds its output gradient, the gradient scattered back to the
      rows and the product for the weights' gradient), a fourth for biased, untrained experts (the down bias rows
      of gpt-oss, a local of the recompute).

    With the experts in `tiles` tiles (`tile_mlps`), the experts' terms are one tile's: divided by `tiles`. The
    router is not tiled.

    Returns:
        `{"router", "experts (saved)", "experts (dispatch)"}`, bytes per token; empty for a dense model.
    """
    if not shape.num_experts:
        return {}
    h, i, k, e = shape.hidden_size, shape.moe_intermediate_size, shape.num_experts_per_tok, shape.num_experts
    saved = BF16 * k * (h + 2 * i + shape.expert_activation_tensors * i) + k * (3 * 8 + BF16 + 1)
    if trained:
        saved += BF16 * k * (h + i)
    dispatch = (3 + (shape.expert_bias and not trained)) * BF16 * k * h
    return {"router": FP32 * e + 8 * k, "experts (saved)": saved / tiles, "experts (dispatch)": dispatch / tiles}


def adapted_expert_bytes(shape: ModelShape) -> int:
    """With LoRA on the experts (PEFT `target_parameters`), bytes one MoE layer's forward or backward holds besides
    the weights: each `ParamWrapper` forms the adapted weight `W + scale * B A` (`_LoraFactorsProxy`, one `baddbmm`)
    for the length of the call, and the grouped matmul keeps it for the input gradient; the backward adds the
    adapted weight's gradient before it reaches the factors. The largest moment: both adapted weights and one
    gradient of the down weight, or the gate/up weight and its gradient: `4 * E * H * I_e` bf16 values. Once per
    layer, or per tile with tiled experts (one tile at a time)."""
    return BF16 * 4 * shape.num_experts * shape.hidden_size * shape.moe_intermediate_size if shape.num_experts else 0


def router_logits_bytes_per_token(shape: ModelShape) -> int:
    """The router aux loss's share per token of the step: the softmax that `load_balancing_loss_func` takes of every
    MoE layer's router logits keeps its `[N, E]` output (bf16, the logits' dtype under autocast; its fp32 copy is
    not kept) until the loss's backward."""
    return BF16 * shape.moe_layers * shape.num_experts

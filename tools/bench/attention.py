"""Attention of one gpt-oss layer at long context: ours (`longctx_flex`) against transformers' implementations.

Providers, all on the same inputs (bf16 q ``[1, 64, T, 64]``, k and v ``[1, 8, T, 64]``, per-head sinks; the shapes of
gpt-oss-20b and -120b), each with the mask transformers builds for it:
- ``longctx_flex``: ``trl_longctx.attention.flex_attention_forward`` (compiled flex attention, sink folded in fp32
  from its log-sum-exp).
- ``hf-flex``: transformers' ``flex_attention`` (the same folding in the activations' dtype; refuses CPU).
- ``eager``: gpt-oss's ``eager_attention_forward`` (``[1, 64, T, T + 1]`` scores; out of memory at long T).

Layers: ``sliding`` (128-token window) and ``full``. Modes: ``forward`` (no grad, as for old/reference log-probs)
and ``full`` (forward + backward to q, k, v and the sinks with a random upstream gradient). Metrics: ``ms``
(p20/p50/p80) and ``GiB`` (peak allocated above the inputs); ``mask-ms`` times building the layer's mask.
``--accuracy`` adds the largest error of the output and of each gradient against gpt-oss's eager attention in
float64 at ``--accuracy-tokens``. Out of memory is recorded as ``OOM``, a provider that refuses as ``refused``.

Example:
    PYTHONPATH=packages/trl_longctx/src:packages/kernels/src:packages/vllm_standby/src \\
        python tools/bench/attention.py --sizes 16384 65536 --out docs/bench/attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, free_cuda, is_oom, markdown_table, peak_gib_above_current, row_recorder, time_ms  # noqa: E402

PROVIDERS = ("longctx_flex", "hf-flex", "eager")
# (query heads, key/value heads, head_dim) of gpt-oss-20b and gpt-oss-120b (the same attention shapes); its window.
HEADS, KV_HEADS, HEAD_DIM, WINDOW = 64, 8, 64, 128


class _Attention(torch.nn.Module):
    """What the attention functions read from gpt-oss's attention module."""

    def __init__(self, sinks: torch.Tensor):
        super().__init__()
        self.num_key_value_groups, self.head_dim, self.is_causal = HEADS // KV_HEADS, HEAD_DIM, True
        self.sinks = torch.nn.Parameter(sinks)


def _config(implementation: str, layer: str):
    import transformers

    config = transformers.GptOssConfig(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                                       sliding_window=WINDOW, layer_types=[f"{layer}_attention"], num_hidden_layers=1)  # fmt: skip
    config._attn_implementation = implementation
    return config


def make_mask(provider: str, layer: str, tokens: int, device, dtype):
    """The mask transformers builds for `provider`'s implementation (a `BlockMask` for flex, a tensor for eager)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from trl_longctx.attention import LONGCTX_FLEX, register_flex_attention

    register_flex_attention()
    implementation = {"longctx_flex": LONGCTX_FLEX, "hf-flex": "flex_attention", "eager": "eager"}[provider]
    embeds = torch.empty(1, tokens, 1, device=device, dtype=dtype)
    build = create_sliding_window_causal_mask if layer == "sliding" else create_causal_mask
    return build(
        config=_config(implementation, layer), inputs_embeds=embeds, attention_mask=None, past_key_values=None
    )


def make_provider(provider: str):
    """``fn(module, q, k, v, mask) -> [1, T, heads, head_dim]``."""
    if provider == "longctx_flex":
        from trl_longctx.attention import flex_attention_forward as forward
    elif provider == "hf-flex":
        from transformers.integrations.flex_attention import flex_attention_forward as forward
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as forward

    def attend(module, q, k, v, mask):
        return forward(module, q, k, v, mask, scaling=HEAD_DIM**-0.5, s_aux=module.sinks)[0]

    return attend


def make_inputs(tokens: int, device, dtype, seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    q, k, v = (
        draw(1, HEADS, tokens, HEAD_DIM),
        draw(1, KV_HEADS, tokens, HEAD_DIM),
        draw(1, KV_HEADS, tokens, HEAD_DIM),
    )
    sinks = torch.linspace(-2.0, 6.0, HEADS).to(device=device, dtype=dtype)
    return q, k, v, sinks, draw(1, tokens, HEADS, HEAD_DIM)


def _step(attend, mode, mask, q, k, v, sinks, grad):
    module = _Attention(sinks.clone())

    def forward():
        with torch.no_grad():
            attend(module, q, k, v, mask)

    def full():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attend(module, *leaves, mask)
        torch.autograd.grad((out * grad).sum(), [*leaves, module.sinks])

    return forward if mode == "forward" else full


def bench_speed(args, device, record) -> None:
    dtype = torch.bfloat16
    for tokens in args.sizes:
        q, k, v, sinks, grad = make_inputs(tokens, device, dtype)
        for layer in args.layers:
            for provider in args.providers:
                base = {"provider": provider, "layer": layer, "T": tokens}
                mask = None
                try:

                    def build(provider=provider, layer=layer, tokens=tokens):
                        return make_mask(provider, layer, tokens, device, dtype)

                    mask = build()
                    mask_ms = time_ms(build, device, max_iters=args.max_iters, target_s=args.target_s)
                    record({**base, "mode": "mask", "metric": "ms", **mask_ms})
                    for mode in args.modes:
                        step = _step(make_provider(provider), mode, mask, q, k, v, sinks, grad)
                        gib = peak_gib_above_current(step, device)
                        ms = time_ms(step, device, max_iters=args.max_iters, target_s=args.target_s)
                        record({**base, "mode": mode, "metric": "ms", **ms})
                        record({**base, "mode": mode, "metric": "GiB", "p20": gib, "p50": gib, "p80": gib})
                except Exception as error:  # noqa: BLE001 - every failure is recorded, with its kind
                    kind = "OOM" if is_oom(error) else "refused"
                    status = (
                        f"{kind}: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                    )
                    record({**base, "metric": "status", "status": status})
                finally:
                    del mask
                    free_cuda()


def bench_accuracy(args, device, record) -> None:
    """Largest error of each provider (bf16 and fp32) against gpt-oss's eager attention in float64."""
    tokens = args.accuracy_tokens
    inputs64 = make_inputs(tokens, device, torch.float64)
    for layer in args.layers:
        reference = _outputs(
            make_provider("eager"), make_mask("eager", layer, tokens, device, torch.float64), inputs64
        )
        for dtype in (torch.bfloat16, torch.float32):
            inputs = tuple(t.to(dtype) for t in inputs64)
            for provider in args.providers:
                base = {"provider": provider, "layer": layer, "T": tokens, "dtype": str(dtype), "metric": "error"}
                try:
                    mask = make_mask(provider, layer, tokens, device, dtype)
                    ours = _outputs(make_provider(provider), mask, inputs)
                    errors = {name: (a.double() - b).abs().max().item() for name, a, b in zip(
                        ("out", "dq", "dk", "dv", "dsinks"), ours, reference, strict=True)}  # fmt: skip
                    record({**base, **errors})
                except Exception as error:  # noqa: BLE001 - recorded
                    record({**base, "status": f"{type(error).__name__}: {str(error)[:160]}"})
                free_cuda()


def _outputs(attend, mask, inputs):
    q, k, v, sinks, grad = inputs
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    module = _Attention(sinks.clone())
    out = attend(module, *leaves, mask)
    grads = torch.autograd.grad((out * grad).sum(), [*leaves, module.sinks])
    return (out.detach(), *grads)


def table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        if r.get("metric") == "status":
            body.append([r["provider"], r["layer"], "-", "-", r["T"], r["status"], None, None])
        elif r.get("metric") in ("ms", "GiB"):
            body.append([r["provider"], r["layer"], r["mode"], r["metric"], r["T"], r["p20"], r["p50"], r["p80"]])
    return markdown_table(["provider", "layer", "mode", "metric", "T", "p20", "p50", "p80"], body)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--layers", nargs="+", choices=("sliding", "full"), default=["sliding", "full"])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=("forward", "full"), default=["forward", "full"])
    p.add_argument("--max-iters", type=int, default=10)
    p.add_argument("--target-s", type=float, default=1.0, help="time budget of the timed calls of one row")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--accuracy-tokens", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    result = {"env": environment(device, ("transformers",)), "args": vars(args) | {"out": str(args.out)}, "rows": []}

    record = row_recorder(result, args.out)

    print(json.dumps(result["env"]), flush=True)
    if args.accuracy:
        bench_accuracy(args, device, record)
    if not args.no_speed:
        bench_speed(args, device, record)
    print(table(result["rows"]))


if __name__ == "__main__":
    main()

"""Per-token log-probs of an lm_head: ours (Triton and torch backends) against the peers, in one run.

Providers, all on the same inputs (bf16 hidden ``[N, H]``, weight ``[V, H]``, targets ``[N]``):
- ``ours-triton`` / ``ours-triton+ent``: ``longctx_kernels.selective_logprobs(backend="triton")``, entropy off/on.
- ``ours-torch``: the chunked torch backend.
- ``materialized``: what TRL does: bf16 logits ``h @ W.T``, fp32 ``log_softmax``, gather.
- ``cce``: Cut Cross-Entropy ``linear_cross_entropy(reduction="none")``, negated.
- ``liger``: Liger-Kernel ``liger_fused_linear_cross_entropy(reduction="none")``, negated (its GRPO loss gives no
  per-token log-probs; this is its fused linear path that does).
- ``trl-fused`` / ``trl-fused+ent``: TRL's own fused lm_head (``GRPOTrainer``'s ``fused_lm_head`` path, 1.16+): its
  ``ChunkedLogProbFunction`` as ``add_fused_lm_head`` calls it, with TRL's vocabulary chunk, entropy off/on.

Modes: ``forward`` (no grad, as for old/reference log-probs) and ``full`` (forward + backward to the hidden states
with a random upstream gradient; lm_head frozen, as with LoRA). Metrics: ``ms`` (p20/p50/p80 over CUDA-event
timed calls) and ``GiB`` (peak allocated above the inputs, the hidden-state gradient included). Out of memory is
recorded as ``OOM``. ``--accuracy`` adds errors against float64 at N=512. ``--sweep`` times the Triton kernels
alone over tile configurations with their registers and spills; ``--profile`` gives the per-kernel time split of
one ``full`` call.

Example:
    PYTHONPATH=packages/kernels/src python tools/bench/logprobs.py --sizes 8192 32768 --out docs/bench/logprobs.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    environment,
    free_cuda,
    is_oom,
    markdown_table,
    peak_gib_above_current,
    row_recorder,
    time_ms,
)

HEADS = {"qwen3": (4096, 151936), "llama31": (4096, 128256), "tiny": (64, 1000)}  # tiny: smoke tests
PROVIDERS = (
    "ours-triton",
    "ours-triton+ent",
    "ours-torch",
    "materialized",
    "cce",
    "liger",
    "trl-fused",
    "trl-fused+ent",
)
MATMUL_TFLOPS = 785.0  # bf16 8192^3 matmul measured on the lent H200 (../shared/GPU.md)


def make_provider(name: str, both: bool = False):
    """``fn(hidden, weight, targets) -> logprobs [N] float32``, or with ``both`` (a ``+ent`` provider) ``(logprobs,
    entropy)``; raises ImportError when the peer is missing."""
    entropy = name.endswith("+ent")
    if name.startswith("ours"):
        from longctx_kernels import selective_logprobs

        backend = "triton" if "triton" in name else "torch"

        def ours(h, w, t):
            out = selective_logprobs(h, w, t, return_entropy=entropy, backend=backend)
            return out if both or not entropy else out[0]

        return ours
    if name == "materialized":

        def materialized(h, w, t):
            logits = h @ w.T
            return torch.log_softmax(logits.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)

        return materialized
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none").float()
    if name == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(h, w, t):
            out = liger_fused_linear_cross_entropy(h, w, t, reduction="none")
            return -(out[0] if isinstance(out, tuple) else out).float()

        return liger
    if name.startswith("trl-fused"):
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        outputs = ("log_probs", "entropy") if entropy else ("log_probs",)

        def trl_fused(h, w, t):
            # As `add_fused_lm_head`'s forward calls it: no bias, temperature 1, no softcap, logit scale 1.
            per_token = ChunkedLogProbFunction.apply(
                h, w, None, t, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs
            )
            return per_token[:2] if both and entropy else per_token[0]

        return trl_fused
    raise ValueError(f"unknown provider {name!r}")


def make_inputs(n: int, hdim: int, vocab: int, device: torch.device, seed: int = 0):
    """bf16 hidden/weight with logits of standard deviation about 3, targets, an upstream gradient."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hdim, device=device, generator=gen).to(torch.bfloat16)
    w = (torch.randn(vocab, hdim, device=device, generator=gen) * (3.0 / hdim**0.5)).to(torch.bfloat16)
    t = torch.randint(0, vocab, (n,), device=device, generator=gen)
    g = torch.randn(n, device=device, generator=gen)
    return h, w, t, g


def _step(fn, mode, h, w, t, g):
    if mode == "forward":

        def step():
            with torch.no_grad():
                fn(h, w, t)

        return step

    def step():
        h.grad = None
        (fn(h, w, t) * g).sum().backward()

    return step


def bench_speed(args, device, record) -> None:
    for head in args.heads:
        hdim, vocab = HEADS[head]
        for n in args.sizes:
            free_cuda()
            h, w, t, g = make_inputs(n, hdim, vocab, device)
            h.requires_grad_(True)
            for prov in args.providers:
                try:
                    fn = make_provider(prov)
                except ImportError as exc:
                    record({"provider": prov, "head": head, "N": n, "status": f"missing: {exc}"})
                    continue
                for mode in args.modes:
                    row = {"provider": prov, "mode": mode, "head": head, "N": n, "H": hdim, "V": vocab}
                    step = _step(fn, mode, h, w, t, g)
                    try:
                        h.grad = None
                        gib = peak_gib_above_current(step, device)  # also the warm-up (compiles)
                        ms = time_ms(step, device, warmup=0, max_iters=args.max_iters, target_s=args.target_s)
                    except Exception as exc:  # noqa: BLE001 - OOM is a result; anything else is re-raised
                        if not is_oom(exc):
                            raise
                        h.grad = None
                        free_cuda()
                        record({**row, "metric": "ms", "status": "OOM"})
                        record({**row, "metric": "GiB", "status": "OOM"})
                        continue
                    h.grad = None
                    flops = (2 if mode == "forward" else 4) * n * hdim * vocab
                    floor_ms = flops / (MATMUL_TFLOPS * 1e12) * 1e3
                    record({**row, "metric": "ms", **ms, "floor_ms": floor_ms, "x_floor": ms["p50"] / floor_ms})
                    record({**row, "metric": "GiB", "p20": gib, "p50": gib, "p80": gib})
            del h, w, t, g


def bench_accuracy(args, device, record) -> None:
    from longctx_kernels import selective_logprobs_reference

    n = 512
    for head in args.heads:
        hdim, vocab = HEADS[head]
        h, w, t, g = make_inputs(n, hdim, vocab, device, seed=1)
        h64 = h.detach().double().requires_grad_()
        ref_lp, ref_ent = selective_logprobs_reference(h64, w.double(), t)
        (ref_lp * g.double()).sum().backward()
        ref_grad = h64.grad
        del h64
        for prov in args.providers:
            try:
                fn = make_provider(prov, both=True)
            except ImportError:
                continue
            hh = h.detach().clone().requires_grad_()
            lp, ent = fn(hh, w, t) if prov.endswith("+ent") else (fn(hh, w, t), None)
            (lp * g).sum().backward()
            row = {
                "provider": prov,
                "head": head,
                "N": n,
                "metric": "error",
                "max_abs_logprob": (lp.double() - ref_lp).abs().max().item(),
                "grad_rel": ((hh.grad.double() - ref_grad).norm() / ref_grad.norm()).item(),
            }
            if ent is not None:
                row["entropy_max_rel"] = ((ent.double() - ref_ent).abs() / ref_ent.abs()).max().item()
            record(row)
        del h, w, t, g, ref_grad
        free_cuda()


def bench_sweep(args, device, record) -> None:
    """Triton kernels alone on one chunk (1024 rows x 16384 vocabulary, H=4096): TFLOP/s, registers, spills."""
    from longctx_kernels.ops.triton import selective_logprobs as op

    rows, vc, hdim = 1024, 16384, 4096
    h, w, t, _ = make_inputs(rows, hdim, vc, device)
    tf = op._Transform(1.0, None, 1.0)
    tiles = [op.TileConfig(*c) for c in ((128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                         (128, 128, 128, 8, 3))]  # fmt: skip
    gemms = [op.GemmConfig(*c) for c in ((128, 256, 64, 8, 3, 8), (128, 256, 64, 8, 4, 8), (256, 128, 64, 8, 3, 8),
                                         (128, 128, 64, 8, 4, 8))]  # fmt: skip
    flops = 2 * rows * hdim * vc
    q = torch.rand(rows, vc, device=device).to(torch.bfloat16)
    acc = torch.zeros(rows, hdim, device=device)
    alpha = torch.rand(rows, device=device)
    zt = torch.empty(rows, device=device)
    for use_tma in (True, False):
        op.USE_TMA = use_tma
        for tile in tiles:
            plan = op._Plan(tile, op.GEMM_CONFIGS[torch.bfloat16], rows, vc, "tf32")
            st = torch.empty(4, rows, vc // tile.block_v, device=device)
            stats = (st[0], st[1], None, zt, zt)

            # With the probabilities stored (a pass with gradient) and without (a no-grad pass: old log-probs).
            for out in (q, None):

                def run(plan=plan, stats=stats, out=out):
                    op._logits_tiles(plan, tf, h, w, None, t, out, rows, 0, vc, stats=stats)

                ms = time_ms(run, device, warmup=2, max_iters=20, target_s=0.3)
                res = op.compiled_resources().get("logits_tile_kernel", {})
                record({"sweep": "logits_tile_kernel", "tma": use_tma, "store_q": out is not None,
                        "config": list(tile.__dict__.values()), "ms": ms["p50"], "tflops": flops / ms["p50"] / 1e9,
                        **res})  # fmt: skip
        scale = torch.rand(rows, vc // op.LOGITS_CONFIGS[torch.bfloat16].block_v, device=device)
        for gemm, scaled in [(g, True) for g in gemms] + [(gemms[0], False)]:
            plan = op._Plan(op.LOGITS_CONFIGS[torch.bfloat16], gemm, rows, vc, "tf32")
            tma = (q, w, 0) if use_tma else None

            def run(plan=plan, scaled=scaled, tma=tma, scale=scale):
                op._gemm(plan, q, q.stride(), w, w.stride(), vc, acc, rows, hdim, vc, a_scale=scale if scaled else None,
                         alpha=alpha, accumulate=True, tma=tma)  # fmt: skip

            ms = time_ms(run, device, warmup=2, max_iters=20, target_s=0.3)
            res = op.compiled_resources().get("gemm_acc_kernel", {})
            record({"sweep": "gemm_acc_kernel", "tma": use_tma, "a_scale": scaled, "config": list(gemm.__dict__.values()),
                    "ms": ms["p50"], "tflops": flops / ms["p50"] / 1e9, **res})  # fmt: skip
    op.USE_TMA = True
    ms = time_ms(lambda: torch.mm(q, w), device, warmup=2, max_iters=20, target_s=0.3)
    record({"sweep": "cublas_mm_same_shape", "ms": ms["p50"], "tflops": flops / ms["p50"] / 1e9})


def bench_profile(args, device, record) -> None:
    """Per-kernel CUDA time of one ``full`` call of ours-triton (Qwen3 head, N = args.profile_n)."""
    from torch.profiler import ProfilerActivity, profile

    hdim, vocab = HEADS["qwen3"]
    h, w, t, g = make_inputs(args.profile_n, hdim, vocab, device)
    h.requires_grad_(True)
    step = _step(make_provider("ours-triton"), "full", h, w, t, g)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.device_time_total)[:12]:
        record({"profile": e.key[:80], "N": args.profile_n, "calls": e.count, "ms": e.device_time_total / 1e3,
                "fraction": e.device_time_total / total})  # fmt: skip


def speed_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        if "metric" not in r or r["metric"] not in ("ms", "GiB"):
            continue
        if r.get("status"):
            body.append([r["provider"], r["mode"], r["metric"], r["head"], r["N"], r["status"], None, None, None])
        else:
            body.append([r["provider"], r["mode"], r["metric"], r["head"], r["N"], r["p20"], r["p50"], r["p80"],
                         r.get("x_floor")])  # fmt: skip
    return markdown_table(["provider", "mode", "metric", "head", "N", "p20", "p50", "p80", "x floor"], body)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--heads", nargs="+", choices=sorted(HEADS), default=["qwen3", "llama31"])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=("forward", "full"), default=["forward", "full"])
    p.add_argument("--max-iters", type=int, default=10)
    p.add_argument("--target-s", type=float, default=1.0, help="time budget of the timed calls of one row")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-n", type=int, default=32768)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    result = {"env": environment(device, ("cut-cross-entropy", "liger-kernel")), "args": vars(args) | {"out": str(args.out)},
              "rows": []}  # fmt: skip

    record = row_recorder(result, args.out)

    print(json.dumps(result["env"]), flush=True)
    if args.sweep:
        bench_sweep(args, device, record)
    if args.accuracy:
        bench_accuracy(args, device, record)
    if args.profile:
        bench_profile(args, device, record)
    if not args.no_speed:
        bench_speed(args, device, record)
    try:
        from longctx_kernels.ops.triton import compiled_resources

        result["triton_resources"] = compiled_resources()
        print("triton kernels (registers, spills):", json.dumps(result["triton_resources"]))
    except ImportError:
        pass
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    print(speed_table(result["rows"]))


if __name__ == "__main__":
    main()

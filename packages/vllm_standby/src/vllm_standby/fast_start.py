"""Faster vLLM start-up for rollouts: CUDA graphs only for the batches a rollout runs, no compile-time benchmarks.

What ``LLM(...)`` spends its start-up on, in vLLM 0.25.0 (the CUDA build) with a dense model such as Qwen3, which runs
on the V2 model runner there (``VllmConfig.use_v2_model_runner``, ``vllm/config/vllm.py:519-574``):

1. Weights (``GPUModelRunner.load_model``, logged as "Model loading took").
2. ``torch.compile`` of the model on the first dummy forward of the memory profile (``Worker.determine_available_memory``
   -> ``profile_run``): Dynamo, then Inductor per piece between attention ops, cached under ``VLLM_CACHE_ROOT``.
   vLLM turns on ``combo_kernels`` and ``benchmark_combo_kernel`` on CUDA with torch>=2.9
   (``vllm/config/compilation.py:957-968``); the latter makes Inductor compile and time every candidate group of
   kernels, each alone and combined, while compiling (``speedup_by_combo_kernel`` in ``torch/_inductor/scheduler.py``).
3. CUDA graphs (``Worker.compile_or_warm_up_model`` -> ``capture_model``, ``vllm/v1/worker/gpu/model_runner.py:685``;
   descriptors in ``vllm/v1/worker/gpu/cudagraph_utils.py:181-294``). The default mode ``FULL_AND_PIECEWISE``
   captures a piecewise graph set (one graph per piece between attention ops, about one per layer) for every capture
   size, for mixed prefill/decode batches, plus a full graph per size up to ``max_num_seqs`` for pure decode batches;
   with LoRA on, each of them also with an adapter. The sizes go up to ``min(2 * max_num_seqs, 512)``
   (``vllm/config/vllm.py:1722-1726``).

A GRPO rollout submits all its prompts at once (at most ``max_num_seqs``, the generations per step) and then only
decodes: after the prefill, every step is a pure decode batch of at most ``max_num_seqs`` sequences, which replays a
full graph. Prefill batches hold hundreds of prompt tokens per sequence, more than any capture size, and run without
graphs either way. So :func:`fast_start_kwargs` sets

- ``cudagraph_mode="FULL_DECODE_ONLY"``: the full decode graphs, none of the piecewise sets (a mixed batch of at most
  ``2 * max_num_seqs`` tokens, which a rollout does not produce, runs without a graph, still compiled);
- ``cudagraph_capture_sizes``: vLLM's own sizes up to ``max_num_seqs`` (and at most 512, as stock) plus
  ``max_num_seqs`` itself, so a decode batch pads to the same size as in stock vLLM;
- ``inductor_compile_config``: ``combo_kernels=True`` (as stock) with ``benchmark_combo_kernel=False``: combos are taken
  without timing them. Timed, Inductor keeps a combo anyway when the kernels take under 0.3 ms (``small_kernel``), as
  small norm and rotary kernels do, so the choice can differ only for longer kernels (CUDA only, torch>=2.9, as
  vLLM's own default; the CPU build uses no combo kernels).

``compile_sizes`` stays empty: each size is one more Inductor compile, with ``max_autotune`` and coordinate-descent
tuning on (``vllm/compilation/compiler_interface.py:753-760``). ``cudagraph_specialize_lora`` stays on: on the V1
runner, turned off, batches without an adapter would find no graph and run eagerly
(``vllm/v1/cudagraph_dispatcher.py:111-130``); on the V2 runner it changes nothing for ``max_loras=1``.

Garbage collection: the V2 runner's ``capture_model`` runs one ``gc.collect()`` and then captures every graph with
automatic collection on and nothing frozen (``vllm/v1/worker/gpu/model_runner.py:685-725``), so a collection can scan
the whole heap (modules, model, compiled artifacts) between or inside captures, and a collection inside a capture can
free a graph or unload a Triton kernel that the capture uses (pytorch/pytorch#161037). vLLM fixed this after 0.25
(vllm-project/vllm#54646: freeze and disable gc around both runners' captures, ``freeze_gc_for_cudagraph_capture``
in 0.31's ``vllm/utils/gc_utils.py``); the V1 runner, used for MoE models, already freezes the heap around capture in
0.25 (``GPUModelRunner._freeze_gc``, ``vllm/v1/worker/gpu_model_runner.py:6391-6401``). There is no explicit
collection per graph: torch>=2.9 collects before a capture only with ``torch.compiler.config.force_cudagraph_gc``
(pytorch/pytorch#158193), and ``gc.collect`` is a no-op while capturing all but the first piece of a piecewise set
(``vllm/compilation/cuda_graph.py:286-300``). :func:`startup_gc_guard` turns automatic collection off for the whole
start-up (compile and capture), which also covers 0.25's V2 captures; vLLM's own explicit collections still run.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

#: vLLM captures no graph above this batch size by default (``vllm/config/vllm.py:1724``); neither do we.
MAX_DEFAULT_CAPTURE_SIZE = 512

_SIZE_KEYS = ("cudagraph_capture_sizes", "max_cudagraph_capture_size")
_COMBO_KEYS = ("combo_kernels", "benchmark_combo_kernel")


def decode_capture_sizes(max_num_seqs: int) -> list[int]:
    """CUDA graph sizes that cover every decode batch of 1 to ``max_num_seqs`` sequences (at most 512).

    vLLM pads a batch to the next captured size. These are vLLM's default sizes (1, 2, 4, multiples of 8 below 256,
    then multiples of 16) up to ``max_num_seqs``, plus ``max_num_seqs`` itself: a batch pads to the same size as with
    stock vLLM, or to a smaller one.

    Args:
        max_num_seqs: The engine's ``max_num_seqs``, a positive int.

    Returns:
        Ascending sizes, the last one ``min(max_num_seqs, 512)``.

    Raises:
        ValueError: ``max_num_seqs`` is not a positive int.

    Example:
        >>> decode_capture_sizes(20)
        [1, 2, 4, 8, 16, 20]
    """
    _check_max_num_seqs(max_num_seqs)
    top = min(max_num_seqs, MAX_DEFAULT_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4) if s <= top]
    sizes += range(8, min(top, 255) + 1, 8)
    sizes += range(256, top + 1, 16)
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def fast_start_kwargs(max_num_seqs: int | None = None, **engine_kwargs: Any) -> dict[str, Any]:
    """Engine keyword arguments for a faster start: the caller's, plus our compilation settings where unset.

    A value the caller passed is never changed: keys of a ``compilation_config`` dict win over ours (ours are added
    beside them, in a new dict), and a ``vllm.config.CompilationConfig`` object is used as is. Capture sizes are left
    to vLLM when the caller set ``cudagraph_capture_sizes`` or ``max_cudagraph_capture_size``; the graph mode when the
    caller set ``cudagraph_mode`` or ``optimization_level``; both combo-kernel options when the caller set either.
    With ``enforce_eager=True`` nothing is compiled or captured, and nothing is added.

    Args:
        max_num_seqs: Most sequences per engine step: the generations of one rollout. Required.
        **engine_kwargs: Other keyword arguments for ``vllm.LLM`` (or :class:`vllm_standby.StandbyLLM`).

    Returns:
        A new dict of keyword arguments for ``vllm.LLM``, ``max_num_seqs`` included.

    Raises:
        ValueError: ``max_num_seqs`` is missing or not a positive int; ``compilation_config`` or its
            ``inductor_compile_config`` has an unsupported type; ``speculative_config`` is set (decode batches then
            hold several tokens per sequence, which these sizes do not cover).

    Example:
        >>> kwargs = fast_start_kwargs(max_num_seqs=8, model="Qwen/Qwen3-1.7B")
        >>> kwargs["compilation_config"]["cudagraph_capture_sizes"]
        [1, 2, 4, 8]
        >>> llm = vllm.LLM(**kwargs)  # doctest: +SKIP
    """
    if max_num_seqs is None:
        raise ValueError(
            "fast start needs max_num_seqs (the most sequences per step, e.g. the generations of one rollout): "
            "CUDA graphs are captured for batches of 1 to max_num_seqs sequences"
        )
    _check_max_num_seqs(max_num_seqs)
    if engine_kwargs.get("speculative_config") is not None:
        raise ValueError(
            "fast start does not support speculative_config (decode batches then hold several tokens per sequence); "
            "pass compilation_config yourself or turn fast start off"
        )
    kwargs = {**engine_kwargs, "max_num_seqs": max_num_seqs}
    if engine_kwargs.get("enforce_eager"):
        return kwargs
    config = _compilation_config_dict(engine_kwargs.get("compilation_config"))
    if config is None:  # a CompilationConfig object: the caller's, complete
        return kwargs
    if not any(key in config for key in _SIZE_KEYS):
        config["cudagraph_capture_sizes"] = decode_capture_sizes(max_num_seqs)
    if "cudagraph_mode" not in config and "optimization_level" not in engine_kwargs:
        config["cudagraph_mode"] = "FULL_DECODE_ONLY"
    inductor = config.get("inductor_compile_config", {})
    if not isinstance(inductor, dict):
        raise ValueError(f"compilation_config.inductor_compile_config must be a dict, got {type(inductor).__name__}")
    if not any(key in inductor for key in _COMBO_KEYS) and _combo_kernels_by_default():
        # Keep vLLM's combo kernels (it sets both keys only when neither is given), without timing them at compile.
        config["inductor_compile_config"] = {**inductor, "combo_kernels": True, "benchmark_combo_kernel": False}
    kwargs["compilation_config"] = config
    return kwargs


@contextlib.contextmanager
def startup_gc_guard() -> Iterator[None]:
    """No automatic garbage collection while an engine starts; explicit ``gc.collect()`` calls still run.

    On entry, the objects alive now (modules, a trainer's model) are frozen, unless something froze the heap
    before, so that vLLM's explicit collections during start-up skip them. On exit, automatic collection is back as
    it was, and our freeze is undone, unless the heap was frozen again meanwhile (more objects frozen than we froze):
    vLLM freezes the heap itself at the end of start-up in the engine's process (``freeze_gc_heap``,
    ``vllm/v1/worker/gpu_worker.py:887`` and ``vllm/v1/engine/core.py:232``), which stays.

    Example:
        >>> with startup_gc_guard():
        ...     llm = vllm.LLM(**fast_start_kwargs(max_num_seqs=8, model=path))  # doctest: +SKIP
    """
    was_enabled = gc.isenabled()
    we_freeze = gc.get_freeze_count() == 0
    if we_freeze:
        gc.freeze()
    frozen = gc.get_freeze_count()
    gc.disable()
    try:
        yield
    finally:
        # Frozen objects freed since only lower the count; a freeze by someone else raises it (vLLM freezes the
        # whole heap, grown by the engine) or an unfreeze has emptied it already.
        if we_freeze and 0 < gc.get_freeze_count() <= frozen:
            gc.unfreeze()
        if was_enabled:
            gc.enable()


def _check_max_num_seqs(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_num_seqs must be a positive int, got {value!r}")


def _compilation_config_dict(value: Any) -> dict[str, Any] | None:
    """The caller's ``compilation_config`` as a new dict; ``None`` for a ``CompilationConfig`` object."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return {"mode": value}  # vLLM reads an int as the compilation mode
    from vllm.config import CompilationConfig

    if isinstance(value, CompilationConfig):
        return None
    raise ValueError(
        "compilation_config must be None, a dict, an int (the mode) or a vllm.config.CompilationConfig, "
        f"got {type(value).__name__}"
    )


def _combo_kernels_by_default() -> bool:
    """Whether vLLM turns on Inductor combo kernels by default here: torch>=2.9, not the CPU platform."""
    import torch
    from packaging.version import Version

    if Version(torch.__version__).release < (2, 9):
        return False
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


__all__ = ["MAX_DEFAULT_CAPTURE_SIZE", "decode_capture_sizes", "fast_start_kwargs", "startup_gc_guard"]

"""Memory of a long-context GRPO step: offloaded gradient checkpoints, sequence-tiled MLPs and the planner that
predicts the peak.

The planner (`planner`: the memory model and the search; `shapes`: what a model is counted by; `moe_terms`: the
terms of MoE layers; `presets`: model shapes; `rollout_kv`: the vLLM side; `capacity`: the most sequences a step takes;
`machine`: GPU presets and this machine's memory; `plan_cli`: `longctx-grpo plan`) is plain Python (no torch), so
`longctx-grpo plan` stays light; `CheckpointOffloader` and the tiled MLP are imported on first use.
"""

from .planner import MemoryPlan, ModelShape, TrainSetup, longest_completion, plan_memory
from .presets import PRESETS, load_model_shape

__all__ = [
    "PRESETS",
    "CheckpointOffloader",
    "MemoryPlan",
    "ModelShape",
    "TrainSetup",
    "auto_mlp_chunks",
    "load_model_shape",
    "longest_completion",
    "plan_memory",
    "tile_mlps",
    "tiled_forward",
]

_TILED_MLP = ("auto_mlp_chunks", "tile_mlps", "tiled_forward")


def __getattr__(name):
    if name == "CheckpointOffloader":
        from .offload_checkpoints import CheckpointOffloader

        return CheckpointOffloader
    if name in _TILED_MLP:
        from . import tiled_mlp as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

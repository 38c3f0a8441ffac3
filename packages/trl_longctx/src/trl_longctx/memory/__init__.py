"""Memory of a long-context GRPO step: offloaded gradient checkpoints and the planner that predicts the peak.

The planner is plain Python (no torch), so `longctx-grpo plan` stays light; `CheckpointOffloader` is imported on
first use.
"""

from .planner import MemoryPlan, ModelShape, TrainSetup, longest_completion, plan_memory
from .presets import PRESETS, load_model_shape

__all__ = [
    "PRESETS",
    "CheckpointOffloader",
    "MemoryPlan",
    "ModelShape",
    "TrainSetup",
    "load_model_shape",
    "longest_completion",
    "plan_memory",
]


def __getattr__(name):
    if name == "CheckpointOffloader":
        from .offload_checkpoints import CheckpointOffloader

        return CheckpointOffloader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""longctx-rl's TRL integration: `LongContextGRPOTrainer`, a drop-in `GRPOTrainer` for long completions.

The two classes are imported on first use, so light entry points (`longctx-grpo plan`, `--help`) import no TRL,
transformers or torch.
"""

from ._versions import check_versions

check_versions()

__version__ = "0.1.0"
__all__ = ["LongContextGRPOConfig", "LongContextGRPOTrainer", "__version__"]


def __getattr__(name: str):
    if name == "LongContextGRPOConfig":
        from .longctx_grpo_config import LongContextGRPOConfig

        return LongContextGRPOConfig
    if name == "LongContextGRPOTrainer":
        from .longctx_grpo_trainer import LongContextGRPOTrainer

        return LongContextGRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""longctx-rl's TRL integration: `LongContextGRPOTrainer`, a drop-in `GRPOTrainer` for long completions."""

from ._versions import check_versions

check_versions()

from .longctx_grpo_config import LongContextGRPOConfig  # noqa: E402
from .longctx_grpo_trainer import LongContextGRPOTrainer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LongContextGRPOConfig", "LongContextGRPOTrainer", "__version__"]

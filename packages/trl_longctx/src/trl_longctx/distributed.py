"""Running our fused log-prob path under Accelerate's wrappers (DDP, FSDP2, DeepSpeed ZeRO).

`LongContextGRPOTrainer` calls the decoder and reads `lm_head.weight` itself instead of calling the model. Two things
break when a distributed wrapper sits around the model:

- DDP arms its gradient all-reduce in `DistributedDataParallel.forward` (`prepare_for_backward`), and FSDP2 /
  DeepSpeed gather sharded parameters in the wrapper's and the root module's forward hooks. A direct call to the
  inner decoder skips both: gradients are not synchronised (or DDP errors in the next step), and root-level
  parameters stay sharded. `ForwardRedirection` runs our method *inside* the wrapper's forward, as TRL does for its
  chunked losses (`trl.models.utils._ForwardRedirection`, after PyTorch Lightning's strategy).
- Under ZeRO-3 every parameter is partitioned to `numel() == 0` outside its own module's forward, and the lm_head's
  forward never runs on our path, so its weight is gathered explicitly (`deepspeed.zero.GatheredParameters`, through
  TRL's `maybe_gather_lm_head_ctx`). The fused kernel's backward recomputes from the weight, and the weight's
  gradient must reach a gathered parameter, after that gather has ended: the lm_head's parameters are registered
  with DeepSpeed as external parameters of the model (`register_external_parameter`), so ZeRO-3 gathers them
  around the model's forward and again around its backward, which starts at the redirected forward's outputs. The
  model's inputs take no gradient, so DeepSpeed's release after the model's backward never fires: the lm_head would
  stay gathered (one full lm_head per GPU); `ReleaseLmHeadCallback` partitions it again after each optimizer step.
  Under FSDP2 the lm_head lives in the root shard group, which the redirected forward un-shards;
  a `DTensor` weight seen anyway (lm_head wrapped on its own) is gathered with `full_tensor()`, which is
  differentiable, so its gradient flows back to the shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from transformers import TrainerCallback


class ForwardRedirection:
    """Run `method(*args, **kwargs)` inside `wrapper.forward`, so the wrapper's hooks fire around it.

    `inner.forward` is replaced for exactly one call by a function that restores it and runs `method`; the wrapper
    then sees an ordinary forward of the module it wraps. While a redirected call runs, `active` is `True`, so a
    method that redirects itself (calls this with itself as `method`) does not recurse.

    Example:
        >>> redirect = ForwardRedirection()
        >>> logps = redirect(ddp_model, ddp_model.module, compute_logps, ddp_model.module, input_ids)
    """

    def __init__(self):
        self.active = False

    def needed(self, wrapper: nn.Module, inner: nn.Module) -> bool:
        """Whether a call must be redirected: a wrapper is present, FSDP2 shards the model in place (its hooks sit on
        the model's own forward), or ZeRO-3 partitions the lm_head."""
        if self.active:
            return False
        return wrapper is not inner or isinstance(inner, _fsdp2_module_type()) or _zero3_enabled()

    def __call__(self, wrapper: nn.Module, inner: nn.Module, method: Callable, *args, **kwargs):
        """Call `method(*args, **kwargs)` through `wrapper`'s forward and return its result.

        Args:
            wrapper: The module Accelerate prepared (`DistributedDataParallel`, a `DeepSpeedEngine`), or `inner` itself
                (an FSDP2 root, whose hooks are on its own `forward`; a ZeRO-3 module passed unwrapped).
            inner: The model `wrapper` wraps (`accelerator.unwrap_model(wrapper)`).
            method: The function to run; it receives `*args, **kwargs` unchanged.
        """
        original_forward = inner.forward

        def redirected_forward(*_args, **_kwargs):
            inner.forward = original_forward
            return method(*_args, **_kwargs)

        self.active = True
        try:
            with lm_head_gathered(inner):
                inner.forward = redirected_forward
                return wrapper(*args, **kwargs)
        finally:
            inner.forward = original_forward
            self.active = False


def _fsdp2_module_type() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def _zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def lm_head_gathered(model: nn.Module):
    """Context in which a ZeRO-3-partitioned lm_head of `model` holds its full weight (a null context otherwise).

    Under ZeRO-3 it also registers the lm_head's parameters as external parameters of `model` (again is a no-op), so
    that DeepSpeed gathers them for `model`'s backward too: the fused kernel's backward reads the weight, and its
    gradient is reduced and partitioned by ZeRO-3's hooks as any parameter's."""
    if not _zero3_enabled():
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    lm_head = model.get_output_embeddings()
    for parameter in (lm_head.weight, lm_head.bias):
        if parameter is not None:
            register_external_parameter(model, parameter)
    return maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias)


def release_lm_head(model: nn.Module) -> bool:
    """Under ZeRO-3, partition `model`'s lm_head parameters again where a pass left them gathered (module
    docstring); returns whether any was. Outside ZeRO-3, or with nothing gathered, it does nothing."""
    if not _zero3_enabled():
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    lm_head = model.get_output_embeddings()
    gathered = [
        p for p in (lm_head.weight, lm_head.bias) if p is not None and p.ds_status == ZeroParamStatus.AVAILABLE
    ]
    for parameter in gathered:
        parameter.partition()  # its partition already holds the step's update: only the full copy is freed
    return bool(gathered)


class ReleaseLmHeadCallback(TrainerCallback):
    """After each optimizer step, `release_lm_head` of the trained model, so the lm_head the passes gathered does not
    stay on every GPU between steps (ZeRO-3)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def on_step_end(self, args, state, control, **kwargs):
        release_lm_head(self.model)


def full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The full tensor of an FSDP2 `DTensor` shard (differentiable); any other tensor (or `None`) unchanged."""
    if tensor is not None and hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh"):
        return tensor.full_tensor()
    return tensor

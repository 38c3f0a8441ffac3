"""``lora_request``: hand the current PEFT adapter to vLLM as in-memory tensors, under a fresh adapter id.

vLLM's ``LoRARequest`` only carries a path. The adapter's tensors and config go into a process-local registry
under a ``vllm-standby://<id>`` path, and the patched ``WorkerLoRAManager._load_adapter`` (every range module of
:mod:`vllm_standby.patches`) builds the ``LoRAModel`` from them with vLLM's own ``from_lora_tensors``. The
registry lives in this process, so the engine must run in it too (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as in TRL
colocate mode).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from typing import Any

import torch

SCHEME = "vllm-standby://"
# Entries kept for re-loading an adapter vLLM evicted from its cache; older ones are dropped.
MAX_KEPT = 4

_LOCK = threading.Lock()
_IDS = itertools.count(1)
_REGISTRY: OrderedDict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = OrderedDict()


def lookup(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Tensors and PEFT config registered under ``path``; ``None`` when ``path`` is not an in-memory adapter.

    Raises:
        KeyError: ``path`` uses the in-memory scheme but is no longer (or never was) registered in this process.
    """
    if not path.startswith(SCHEME):
        return None
    with _LOCK:
        if path not in _REGISTRY:
            raise KeyError(
                f"in-memory LoRA {path} is not registered in this process: was the engine started in another process "
                f"(set VLLM_ENABLE_V1_MULTIPROCESSING=0), or was it dropped (only the last {MAX_KEPT} are kept)?"
            )
        return _REGISTRY[path]


def lora_request(peft_model: Any, adapter_name: str = "default") -> Any:
    """A ``vllm.lora.request.LoRARequest`` for the current weights of a PEFT LoRA adapter, without a disk.

    Each call snapshots the adapter (tensors are cloned, so vLLM's in-place pre-scaling of B never touches the
    trainer's parameters) and gets a fresh ``lora_int_id``, because vLLM caches adapters by id.

    Args:
        peft_model: A ``peft.PeftModel`` with a LoRA adapter.
        adapter_name: Which adapter of ``peft_model``.

    Returns:
        A ``LoRARequest`` to pass as ``lora_request=`` to ``generate``.

    Raises:
        ValueError: the adapter is not a LoRA adapter.

    Example:
        >>> outs = llm.generate(prompts, params, lora_request=vllm_standby.lora_request(peft_model))  # doctest: +SKIP
    """
    from peft import get_peft_model_state_dict
    from vllm.lora.request import LoRARequest

    config = peft_model.peft_config[adapter_name]
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise ValueError(f"lora_request needs a LoRA adapter, got {getattr(config, 'peft_type', None)}")
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    tensors = {name: t.detach().clone() for name, t in state.items()}
    config_dict = config.to_dict()
    config_dict["target_modules"] = sorted(config_dict["target_modules"])
    lora_id = next(_IDS)
    path = f"{SCHEME}{lora_id}"
    with _LOCK:
        _REGISTRY[path] = (tensors, config_dict)
        while len(_REGISTRY) > MAX_KEPT:
            _REGISTRY.popitem(last=False)
    return LoRARequest(lora_name=f"vllm-standby-{lora_id}", lora_int_id=lora_id, lora_path=path)

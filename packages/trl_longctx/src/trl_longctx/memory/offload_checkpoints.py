"""Offloaded gradient checkpointing for Hugging Face decoder layers.

With gradient checkpointing, each decoder layer keeps only its input `[B, T, H]` between forward and backward:
`layers * B * T * H * 2` bytes in bf16, 9.0 GiB for Qwen3-8B (36 layers, H=4096) at 2 x 32,768 tokens. This module
moves those inputs to pinned host memory while the forward runs and brings each back one layer ahead of the backward.

How it hooks in: transformers' `GradientCheckpointingLayer.__call__` calls `self._gradient_checkpointing_func(fn,
hidden_states)`. Inside `CheckpointOffloader.offload(model)` that function is wrapped per layer so that the checkpoint
runs under `torch.autograd.graph.saved_tensors_hooks`. Both of torch's checkpoint modes save the layer input through
those hooks (the reentrant one by `ctx.save_for_backward`, the non-reentrant one by `_CheckpointFrame.save_inputs`,
before its own inner hooks are pushed), and nothing else of the layer passes through them, so the pack hook sees
exactly the checkpointed input. Tensors that are not the layer's hidden-state input pass through untouched.

On CUDA the device-to-host copy runs on a side stream after an event of the compute stream, so the forward does not
wait; the caching allocator is told (`record_stream`) not to reuse the GPU block before the copy is done. In the
backward, unpacking layer `i` starts the host-to-device copy of layer `i - 1` on the side stream, so it overlaps the
recompute and backward of layer `i`. The last checkpointed layer stays on the GPU: its backward comes first, there
is nothing to overlap its copy with. On CPU the same code runs with plain synchronous copies into the same buffer
pool, so CI checks the bookkeeping and the numerics.

Pinned buffers are allocated once and reused: a buffer returns to the pool when the autograd graph that holds it is
freed (after the backward), and a step of the same shapes takes the same buffers again. Pinning runs an order of
magnitude slower than copying into memory already pinned, so allocating per step would cost more than the copies
themselves. Where the coming step's sizes are known ahead (after the rollout), `CheckpointOffloader.reserve` allocates
and pins what the pool lacks on a background thread while the GPU does other work; the step's first offload waits
for it and takes those buffers.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn
from transformers import TrainerCallback

# Buffers are sized up to a multiple of this, so that completion lengths that vary a little between steps (TRL pads
# to the longest completion of the batch) land on the same buffers instead of allocating new ones.
_BUFFER_GRANULARITY = 2 * 2**20


def _page_lock(buffer: torch.Tensor) -> None:
    """Pin `buffer` for asynchronous copies, at its exact size, until the tensor is freed.

    `torch.empty(..., pin_memory=True)` goes through torch's caching host allocator, which rounds every request up
    to a power of two: a 2.05 GiB layer input (Qwen3-8B, 2 x 131,072 tokens) takes 4 GiB, so the 35 offloaded
    inputs of its 36 layers ask for 140 GiB instead of 72. Registering plain memory with CUDA pins exactly what is
    used.
    """
    cudart = torch.cuda.cudart()
    pointer, nbytes = buffer.data_ptr(), buffer.numel()
    status = cudart.cudaHostRegister(pointer, nbytes, 0)
    if int(status) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {int(status)}")
    weakref.finalize(buffer, cudart.cudaHostUnregister, pointer)


class HostAllocations(NamedTuple):
    """Host buffers a pool allocated: how many, their bytes, and the seconds spent allocating (and pinning) them."""

    count: int
    nbytes: int
    seconds: float

    def since(self, before: HostAllocations) -> HostAllocations:
        """What was allocated between `before` and this record."""
        return HostAllocations(self.count - before.count, self.nbytes - before.nbytes, self.seconds - before.seconds)


class HostReservation(NamedTuple):
    """Host buffers allocated (and pinned) on a background thread ahead of a step (`CheckpointOffloader.reserve`).

    Attributes:
        count, nbytes: The buffers the thread allocated, and their bytes.
        seconds: The thread's time.
        waited: The seconds the step waited for the thread to finish (0 when it was done before).
        error: What stopped the thread early (`"Type: message"`), `None` if nothing: the step then allocates the
            buffers it still needs itself, where the same error is raised.
    """

    count: int
    nbytes: int
    seconds: float
    waited: float
    error: str | None


def _rounded(nbytes: int) -> int:
    """`nbytes` rounded up to the pool's granularity."""
    return -(-nbytes // _BUFFER_GRANULARITY) * _BUFFER_GRANULARITY


def _new_buffer(size: int, pin_memory: bool) -> torch.Tensor:
    buffer = torch.empty(size, dtype=torch.uint8)
    if pin_memory:
        _page_lock(buffer)
    return buffer


class _Reservation:
    """Buffers of given sizes allocated (and pinned) on a thread of its own; `join` waits and reports. Pinning
    (`cudaHostRegister`) runs without Python's lock, so the thread does not hold up the process meanwhile."""

    def __init__(self, sizes: list[int], pin_memory: bool):
        self.buffers: list[torch.Tensor] = []
        self._error: BaseException | None = None
        self._seconds = 0.0
        self._thread = threading.Thread(target=self._allocate, args=(sizes, pin_memory), daemon=True,
                                        name="longctx-host-buffers")  # fmt: skip
        self._thread.start()

    def _allocate(self, sizes: list[int], pin_memory: bool) -> None:
        start = time.perf_counter()
        try:
            for size in sizes:
                self.buffers.append(_new_buffer(size, pin_memory))
        except Exception as error:  # noqa: BLE001 - reported by `join`; the step allocates the rest itself
            self._error = error
        self._seconds = time.perf_counter() - start

    def join(self) -> HostReservation:
        start = time.perf_counter()
        self._thread.join()
        error = None if self._error is None else f"{type(self._error).__name__}: {self._error}"
        nbytes = sum(b.numel() for b in self.buffers)
        return HostReservation(len(self.buffers), nbytes, self._seconds, time.perf_counter() - start, error)


class _PinnedPool:
    """Host buffers (pinned when CUDA is used) reused across layers and steps; one job: hand out and take back bytes."""

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        self.free: list[torch.Tensor] = []
        self.in_use = 0
        self.allocations = 0
        self.allocated_bytes = 0  # ever allocated by `acquire`, freed buffers included
        self.allocation_seconds = 0.0  # spent allocating (and pinning) new buffers in `acquire`
        self.settled: list[HostReservation] = []  # reservations handed to the pool, not yet reported
        self._reservation: _Reservation | None = None

    def missing(self, sizes: Sequence[int]) -> list[int]:
        """Of buffers of `sizes` bytes wanted at once, the (rounded) sizes the free buffers cannot hold, each free
        buffer holding one: the largest wanted first, each in the smallest free buffer that holds it."""
        free = sorted(b.numel() for b in self.free)
        missing = []
        for size in sorted(sizes, reverse=True):
            fit = bisect.bisect_left(free, size)
            if fit < len(free):
                free.pop(fit)
            else:
                missing.append(_rounded(size))
        return missing

    def reserve(self, sizes: Sequence[int]) -> None:
        """Start allocating, on a background thread, what the pool lacks for buffers of `sizes` bytes at once."""
        self.settle()
        if missing := self.missing(sizes):
            self._reservation = _Reservation(missing, self.pin_memory)

    def settle(self) -> None:
        """Wait for a reservation under way, if any, and add its buffers to the free ones."""
        if self._reservation is None:
            return
        reservation, self._reservation = self._reservation, None
        self.settled.append(reservation.join())
        self.free.extend(reservation.buffers)

    def acquire(self, nbytes: int) -> torch.Tensor:
        self.settle()
        fitting = [b for b in self.free if b.numel() >= nbytes]
        if fitting:
            buffer = min(fitting, key=torch.Tensor.numel)
            self.free.remove(buffer)
        else:
            # Smaller free buffers were outgrown by a longer sequence; dropping them bounds the pool at
            # (inputs alive at once) x (largest input), instead of keeping one set per length ever seen.
            self.free = [b for b in self.free if b.numel() >= nbytes]
            size = _rounded(nbytes)
            start = time.perf_counter()
            buffer = _new_buffer(size, self.pin_memory)
            self.allocation_seconds += time.perf_counter() - start
            self.allocations += 1
            self.allocated_bytes += size
        self.in_use += 1
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        self.in_use -= 1
        self.free.append(buffer)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.free)

    def clear(self) -> None:
        self.settle()
        self.free.clear()


class _Offloaded:
    """One checkpointed layer input held in a host buffer (the object autograd keeps between pack and unpack)."""

    def __init__(self, offloader: CheckpointOffloader, tensor: torch.Tensor, buffer: torch.Tensor):
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.nbytes = tensor.numel() * tensor.element_size()
        self.host = buffer[: self.nbytes].view(self.dtype).view(self.shape)
        self.prefetched: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        # Return the buffer when autograd drops this object (graph freed after backward), not at first unpack: a
        # backward with `retain_graph=True` may unpack it again.
        weakref.finalize(self, offloader._pool.release, buffer)

    def to_device(self, stream: torch.cuda.Stream | None) -> None:
        """Start the host-to-device copy (on `stream` when CUDA) if it has not started yet."""
        if self.prefetched is not None:
            return
        if stream is None:
            self.prefetched = self.host.clone()
            return
        with torch.cuda.stream(stream):
            # Allocated on the side stream; `record_stream` below hands it to the compute stream.
            self.prefetched = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self.prefetched.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def take(self, stream: torch.cuda.Stream | None) -> torch.Tensor:
        self.to_device(stream)
        tensor, self.prefetched = self.prefetched, None
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            tensor.record_stream(current)
            self.ready = None
        return tensor


class CheckpointOffloader:
    """Move the inputs of checkpointed decoder layers to reusable host buffers during the forward.

    Keep one instance per trainer (its buffer pool is what makes steps after the first allocation-free) and enter
    `offload(model)` around each forward whose backward follows; call `release()` when training ends.

    Args:
        keep_last_on_device: Keep the input of the last checkpointed layer on the device: its backward runs first,
            so its copy back could not overlap anything.

    Example:
        >>> offloader = CheckpointOffloader()
        >>> model.gradient_checkpointing_enable()
        >>> with offloader.offload(model):
        ...     loss = model(input_ids).logits.float().logsumexp(-1).mean()
        >>> loss.backward()
        >>> offloader.release()
    """

    def __init__(self, keep_last_on_device: bool = True):
        self.keep_last_on_device = keep_last_on_device
        self._pool = _PinnedPool(pin_memory=torch.cuda.is_available())
        self._stream: torch.cuda.Stream | None = None
        self.offloaded_count = 0

    @property
    def pool_bytes(self) -> int:
        """Bytes of host buffers held for reuse (not counting those holding live inputs)."""
        return self._pool.nbytes

    @property
    def pool_allocations(self) -> int:
        """How many host buffers were ever allocated (stays flat once steps repeat their shapes)."""
        return self._pool.allocations

    @property
    def allocation_record(self) -> HostAllocations:
        """Host buffers ever allocated where an offload needed one, freed ones included (a step that allocates none adds
        nothing; `since` across a step gives what that step spent). Reserved buffers are not counted here: see
        `settled_reservations`."""
        return HostAllocations(self._pool.allocations, self._pool.allocated_bytes, self._pool.allocation_seconds)

    def reserve(self, sizes: Sequence[int]) -> None:
        """Allocate (and pin, on CUDA) on a background thread what the pool lacks to hold offloaded inputs of `sizes`
        bytes alive at once, e.g. a coming step's; the first offload after it waits for the thread and takes them.

        Sizes too small do no harm (the step allocates what it lacks, as without a reservation); sizes too large hold
        host memory the steps may not use.
        """
        self._pool.reserve(sizes)

    def settled_reservations(self) -> list[HostReservation]:
        """The reservations handed to the pool since the last call (the step that waited for each may log it)."""
        settled, self._pool.settled = self._pool.settled, []
        return settled

    @property
    def buffers_in_use(self) -> int:
        """Host buffers holding inputs whose backward has not run (0 between steps)."""
        return self._pool.in_use

    def release(self) -> None:
        """Free the pooled host buffers (e.g. at the end of training). Buffers still holding inputs free with them."""
        self._pool.clear()
        self._stream = None
        # torch's pinned-memory allocator caches freed blocks for reuse; hand them back to the OS as well.
        empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
        if torch.cuda.is_available() and empty_host_cache is not None:
            empty_host_cache()

    @contextlib.contextmanager
    def offload(self, model: nn.Module, enabled: bool = True) -> Iterator[None]:
        """Offload the checkpointed layer inputs of the forwards run inside this block.

        Args:
            model: A transformers model (or PEFT wrapper) with gradient checkpointing enabled; layers without it
                are left alone.
            enabled: `False` makes the block a no-op (so callers need no branch).

        Raises:
            RuntimeError: If `enabled` and no layer of `model` has gradient checkpointing on.
        """
        if not enabled or not torch.is_grad_enabled():
            yield
            return
        from transformers.modeling_layers import GradientCheckpointingLayer

        # Decoder layers only: the top-level model may carry a `gradient_checkpointing` flag of its own.
        layers = [
            m
            for m in model.modules()
            if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and m.training
        ]
        if not layers:
            raise RuntimeError(
                "offload_checkpoints needs gradient checkpointing: no layer of the model has it enabled "
                "(set gradient_checkpointing=True)."
            )
        # Inputs of one forward, by layer index, so that unpacking layer i can prefetch layer i - 1.
        handles: dict[int, weakref.ref[_Offloaded]] = {}
        originals = [m.__dict__["_gradient_checkpointing_func"] for m in layers]
        last = len(layers) - 1
        for index, (layer, original) in enumerate(zip(layers, originals, strict=True)):
            keep = self.keep_last_on_device and index == last
            layer._gradient_checkpointing_func = self._wrap(original, index, handles, keep)
        try:
            yield
        finally:
            for layer, original in zip(layers, originals, strict=True):
                layer._gradient_checkpointing_func = original

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _wrap(self, checkpoint_func, index: int, handles: dict, keep_on_device: bool):
        def offloaded_checkpoint(function, *args, **kwargs):
            hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if hidden is None or keep_on_device:
                return checkpoint_func(function, *args, **kwargs)
            # Autograd keeps the pack hook alive with every tensor it saved (the hooks object holds both hooks), so
            # the hook must not close over `hidden` itself: that reference alone would keep the GPU copy alive.
            key = (hidden.data_ptr(), hidden.shape)
            del hidden

            def pack(tensor: torch.Tensor):
                if (tensor.data_ptr(), tensor.shape) != key:
                    return tensor
                handle = self._pack(tensor)
                handles[index] = weakref.ref(handle)
                return handle

            def unpack(packed):
                if not isinstance(packed, _Offloaded):
                    return packed
                stream = self._side_stream(packed.device)
                previous = handles.get(index - 1)
                tensor = packed.take(stream)
                if previous is not None and (handle := previous()) is not None:
                    handle.to_device(stream)
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return checkpoint_func(function, *args, **kwargs)

        return offloaded_checkpoint

    def _pack(self, tensor: torch.Tensor) -> _Offloaded:
        nbytes = tensor.numel() * tensor.element_size()
        handle = _Offloaded(self, tensor, self._pool.acquire(nbytes))
        self.offloaded_count += 1
        stream = self._side_stream(tensor.device)
        if stream is None:
            handle.host.copy_(tensor)
            return handle
        # The side stream starts after the compute stream has produced `tensor`; the compute stream goes on.
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            handle.host.copy_(tensor, non_blocking=True)
        # The GPU block of `tensor` may be freed by the forward loop right away; the allocator must not hand it out
        # again before the copy on the side stream has read it.
        tensor.record_stream(stream)
        return handle


def describe_growth(before: HostAllocations, after: HostAllocations) -> str | None:
    """What an offloader's pool allocated (and pinned, on CUDA) between two `allocation_record`s, as a log line;
    `None` when nothing.

    Example:
        >>> describe_growth(HostAllocations(0, 0, 0.0), HostAllocations(35, 35 * 2**30, 12.5))
        'host buffers of offloaded checkpoints: 35 allocated, 35.00 GiB in 12.5 s (2.80 GiB/s); 35 in all'
    """
    grown = after.since(before)
    if grown.count == 0:
        return None
    gib = grown.nbytes / 2**30
    rate = f" ({gib / grown.seconds:.2f} GiB/s)" if grown.seconds > 0 else ""
    return (
        f"host buffers of offloaded checkpoints: {grown.count} allocated, {gib:.2f} GiB in {grown.seconds:.1f} s"
        f"{rate}; {after.count} in all"
    )


def describe_reservation(reservation: HostReservation) -> str:
    """A reservation (`CheckpointOffloader.reserve`) as a log line.

    Example:
        >>> describe_reservation(HostReservation(35, 35 * 2**30, 12.5, 0.0, None))
        'host buffers of offloaded checkpoints: 35 reserved in the background, 35.00 GiB in 12.5 s; the step waited 0.0 s'
    """
    line = (
        f"host buffers of offloaded checkpoints: {reservation.count} reserved in the background, "
        f"{reservation.nbytes / 2**30:.2f} GiB in {reservation.seconds:.1f} s; the step waited {reservation.waited:.1f} s"
    )
    if reservation.error is not None:
        line += f"; stopped early by {reservation.error} (the step allocated the rest itself)"
    return line


class ReleaseBuffersCallback(TrainerCallback):
    """Free a `CheckpointOffloader`'s pinned buffers when training ends, so nothing stays pinned after `train()`."""

    def __init__(self, offloader: CheckpointOffloader):
        self.offloader = offloader

    def on_train_end(self, args, state, control, **kwargs):
        self.offloader.release()

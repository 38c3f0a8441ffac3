"""CheckpointOffloader on a tiny Qwen3 (CPU): same loss and gradients as plain checkpointing, buffers reused."""

import contextlib
import threading
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import assert_close

from trl_longctx.memory import CheckpointOffloader, offload_checkpoints
from trl_longctx.memory.offload_checkpoints import describe_growth, describe_reservation
from trl_longctx.tiny_models import build_tiny_qwen3

# fp32 end to end: offloading only moves the layer inputs, so the numbers should agree to rounding.
TOLERANCES = {"loss": {"atol": 1e-6, "rtol": 1e-6}, "grads": {"atol": 1e-6, "rtol": 1e-5}}
NUM_LAYERS = 3


def make_model(lora: bool, use_reentrant: bool = False):
    model = build_tiny_qwen3(64, num_hidden_layers=NUM_LAYERS, hidden_size=64, intermediate_size=96)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    return model


def run_step(model, input_ids, offloader=None):
    model.zero_grad()
    context = offloader.offload(model) if offloader is not None else contextlib.nullcontext()
    with context:
        logits = model(input_ids=input_ids).logits
    loss = torch.log_softmax(logits.float(), dim=-1)[..., :-1, :].gather(-1, input_ids[:, 1:, None]).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(("lora", "use_reentrant"), [(False, False), (True, False), (True, True)])
def test_same_loss_and_grads_as_plain_checkpointing(lora, use_reentrant):
    model = make_model(lora, use_reentrant)
    input_ids = torch.randint(0, 64, (2, 11))
    expected_loss, expected_grads = run_step(model, input_ids)
    offloader = CheckpointOffloader()
    loss, grads = run_step(model, input_ids, offloader)
    # Every layer's input but the last one's went through the host buffers.
    assert offloader.offloaded_count == NUM_LAYERS - 1
    assert_close(loss, expected_loss, "loss", **TOLERANCES["loss"])
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], name, **TOLERANCES["grads"])
    assert offloader.buffers_in_use == 0


def test_buffers_reused_across_steps_and_released():
    model = make_model(lora=True)
    offloader = CheckpointOffloader()
    lengths = [11, 13, 7, 13, 11, 13]  # completion lengths vary between steps, as TRL pads per batch
    allocations = []
    for length in lengths:
        run_step(model, torch.randint(0, 64, (2, length)), offloader)
        assert offloader.buffers_in_use == 0
        allocations.append(offloader.pool_allocations)
    # Buffers are allocated in the first step only: later steps (shorter or equal) take the same ones.
    assert allocations == [NUM_LAYERS - 1] * len(lengths)
    offloader.release()
    assert offloader.pool_bytes == 0 and offloader.buffers_in_use == 0


def test_keep_last_on_device_false_offloads_every_layer():
    model = make_model(lora=False)
    offloader = CheckpointOffloader(keep_last_on_device=False)
    run_step(model, torch.randint(0, 64, (1, 9)), offloader)
    assert offloader.offloaded_count == NUM_LAYERS


def test_no_grad_and_disabled_are_noops():
    model = make_model(lora=False)
    offloader = CheckpointOffloader()
    with torch.no_grad(), offloader.offload(model):
        model(input_ids=torch.randint(0, 64, (1, 5)))
    with offloader.offload(model, enabled=False):
        model(input_ids=torch.randint(0, 64, (1, 5))).logits.sum().backward()
    assert offloader.offloaded_count == 0 and offloader.pool_allocations == 0


def test_needs_gradient_checkpointing():
    model = build_tiny_qwen3(64, num_hidden_layers=1, hidden_size=64, intermediate_size=96).train()
    with pytest.raises(RuntimeError, match="gradient_checkpointing"), CheckpointOffloader().offload(model):
        pass


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_device_copies_of_offloaded_inputs_are_freed_during_forward(use_reentrant):
    # What offloading is for: between forward and backward, nothing may keep the device copy of an offloaded layer
    # input alive (on the GPU a stray reference keeps the whole `B * T * H` block allocated).
    import weakref

    def inputs_alive_after_forward(offloader):
        model = make_model(lora=True, use_reentrant=use_reentrant)
        refs = []
        for layer in model.base_model.model.model.layers:
            layer.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))
        context = offloader.offload(model) if offloader is not None else contextlib.nullcontext()
        with context:
            loss = model(input_ids=torch.randint(0, 64, (2, 11))).logits.float().mean()
        alive = [ref() is not None for ref in refs]
        loss.backward()
        return alive

    assert inputs_alive_after_forward(None)[1:] == [True] * (NUM_LAYERS - 1)  # plain checkpointing keeps them
    # With offloading only the last layer's input (kept on the device) is still alive.
    assert inputs_alive_after_forward(CheckpointOffloader())[1:] == [False] * (NUM_LAYERS - 2) + [True]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "gemma3"])
def test_other_architectures_with_lora(arch):
    """Llama, Qwen2, Mistral, Gemma 2/3 decoders with LoRA: offloaded checkpoints give plain checkpointing's numbers."""
    from testing_utils import VOCAB, build_model

    model = build_model(arch, lora=True, layers=3)
    input_ids = torch.randint(0, VOCAB, (2, 11))
    expected_loss, expected_grads = run_step(model, input_ids)
    offloader = CheckpointOffloader()
    loss, grads = run_step(model, input_ids, offloader)
    assert offloader.offloaded_count == 2
    assert_close(loss, expected_loss, "loss", **TOLERANCES["loss"])
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], name, **TOLERANCES["grads"])


@pytest.mark.parametrize("lora", ["none", "experts"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_moe_decoder_layers(arch, lora):
    """Qwen3-MoE, gpt-oss and Mixtral decoder layers, fully trained or with LoRA on the fused expert weights: the same
    log-likelihood, router aux loss (its router logits are recorded inside the offloaded layers) and gradients as
    plain checkpointing."""
    from testing_utils import VOCAB, build_moe_model

    model = build_moe_model(arch, lora, layers=3)
    input_ids = torch.randint(0, VOCAB, (2, 11))

    def step(offloader=None):
        model.zero_grad()
        with offloader.offload(model) if offloader is not None else contextlib.nullcontext():
            out = model(input_ids=input_ids, output_router_logits=True)
        likelihood = torch.log_softmax(out.logits.float(), -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).mean()
        (likelihood + 10.0 * out.aux_loss).backward()  # aux loss weighted so that its gradient shows
        return likelihood.detach(), out.aux_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                            if p.grad is not None}  # fmt: skip

    expected = step()
    offloader = CheckpointOffloader()
    actual = step(offloader)
    assert offloader.offloaded_count == 2 and offloader.buffers_in_use == 0
    assert_close(actual[0], expected[0], "log-likelihood", **TOLERANCES["loss"])
    assert_close(actual[1], expected[1], "aux loss", **TOLERANCES["loss"])
    assert actual[2].keys() == expected[2].keys() and actual[2]
    for name, grad in actual[2].items():
        assert_close(grad, expected[2][name], name, **TOLERANCES["grads"])


def test_allocation_record_counts_the_first_step_only():
    model = make_model(lora=True)
    offloader = CheckpointOffloader()
    start = offloader.allocation_record
    run_step(model, torch.randint(0, 64, (2, 11)), offloader)
    first = offloader.allocation_record
    run_step(model, torch.randint(0, 64, (2, 9)), offloader)
    # Two offloaded inputs of 2 x 11 x 64 fp32 values, each rounded up to one 2 MiB buffer; time spent, measured.
    assert first[:2] == (NUM_LAYERS - 1, (NUM_LAYERS - 1) * 2 * 2**20) and first.seconds > 0
    assert first.since(start) == first  # nothing was allocated before the first step
    assert offloader.allocation_record == first  # the second step reused them
    assert describe_growth(first, offloader.allocation_record) is None
    line = describe_growth(start, first)
    assert line.startswith(f"host buffers of offloaded checkpoints: {NUM_LAYERS - 1} allocated, 0.00 GiB in ")
    assert line.endswith(f"; {NUM_LAYERS - 1} in all")


MIB = 2**20


def test_reserved_buffers_are_taken_by_the_next_step():
    """Buffers reserved ahead (as after a rollout) serve the step's offloads: it allocates none itself."""
    model = make_model(lora=True)
    offloader = CheckpointOffloader()
    offloader.reserve([2 * 11 * 64 * 4] * (NUM_LAYERS - 1))  # 2 sequences x 11 tokens x 64 fp32 values per layer
    run_step(model, torch.randint(0, 64, (2, 11)), offloader)
    assert offloader.allocation_record.count == 0 and offloader.offloaded_count == NUM_LAYERS - 1
    (reserved,) = offloader.settled_reservations()
    assert (reserved.count, reserved.nbytes, reserved.error) == (NUM_LAYERS - 1, (NUM_LAYERS - 1) * 2 * MIB, None)
    assert offloader.settled_reservations() == []  # reported once
    assert describe_reservation(reserved).startswith(
        f"host buffers of offloaded checkpoints: {NUM_LAYERS - 1} reserved in the background, 0.00 GiB in "
    )
    # What the pool holds already is not reserved again.
    offloader.reserve([2 * 11 * 64 * 4] * (NUM_LAYERS - 1))
    run_step(model, torch.randint(0, 64, (2, 11)), offloader)
    assert offloader.settled_reservations() == [] and offloader.allocation_record.count == 0


def test_reserve_allocates_only_what_the_free_buffers_cannot_hold():
    offloader = CheckpointOffloader()
    offloader.reserve([2 * MIB, 2 * MIB])
    offloader.release()  # waits for the thread; its buffers are then freed
    offloader.reserve([2 * MIB, 2 * MIB])
    offloader._pool.settle()
    assert offloader._pool.nbytes == 4 * MIB
    # Largest first, each in the smallest free buffer that holds it: 3 MiB fits none (4 MiB reserved), the two 1 MiB
    # ones take the two free 2 MiB buffers.
    assert offloader._pool.missing([MIB, 3 * MIB, MIB]) == [4 * MIB]
    assert offloader._pool.missing([2 * MIB, 2 * MIB, 1]) == [2 * MIB]
    assert offloader._pool.missing([MIB]) == []


def test_the_step_waits_for_a_reservation_under_way(monkeypatch):
    allocate = offload_checkpoints._new_buffer

    def slow(size, pin_memory):
        time.sleep(0.3)
        return allocate(size, pin_memory)

    monkeypatch.setattr(offload_checkpoints, "_new_buffer", slow)
    offloader = CheckpointOffloader()
    start = time.perf_counter()
    offloader.reserve([MIB])
    assert time.perf_counter() - start < 0.2  # the thread allocates; the caller goes on
    run_step(make_model(lora=True), torch.randint(0, 64, (2, 11)), offloader)
    (reserved,) = offloader.settled_reservations()
    assert reserved.count == 1 and reserved.seconds >= 0.3 and reserved.waited > 0


def test_a_reservation_stopped_by_an_error_leaves_the_rest_to_the_step(monkeypatch):
    """Pinning that fails on the background thread (e.g. a host-memory limit) is reported when the step takes the
    buffers; the step allocates what is missing itself, where a lasting error would then be raised."""
    allocate, made = offload_checkpoints._new_buffer, []

    def fails_on_the_second(size, pin_memory):
        if threading.current_thread().name == "longctx-host-buffers" and made:
            raise RuntimeError("cudaHostRegister of 2097152 bytes failed with CUDA error 2")
        made.append(size)
        return allocate(size, pin_memory)

    monkeypatch.setattr(offload_checkpoints, "_new_buffer", fails_on_the_second)
    offloader = CheckpointOffloader()
    offloader.reserve([2 * 11 * 64 * 4] * (NUM_LAYERS - 1))
    run_step(make_model(lora=True), torch.randint(0, 64, (2, 11)), offloader)
    (reserved,) = offloader.settled_reservations()
    assert (
        reserved.count == 1
        and reserved.error == "RuntimeError: cudaHostRegister of 2097152 bytes failed with CUDA error 2"
    )
    assert offloader.allocation_record.count == NUM_LAYERS - 2  # the step allocated the rest
    assert describe_reservation(reserved).endswith(
        "; stopped early by RuntimeError: cudaHostRegister of 2097152 bytes failed with CUDA error 2 (the step "
        "allocated the rest itself)"
    )

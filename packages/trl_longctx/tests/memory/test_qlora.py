"""QLoRA (bitsandbytes NF4 weights, loaded by transformers' `BitsAndBytesConfig`) on CPU: offloaded checkpoints and
tiled MLPs give the numbers of plain checkpointing; the trainer's planner sees the model as "qlora"."""

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import assert_close

from trl_longctx.memory import CheckpointOffloader, tile_mlps
from trl_longctx.tiny_models import build_tiny_qwen3

bnb = pytest.importorskip("bitsandbytes")

# fp32 compute on the dequantized NF4 weights: offload moves layer inputs, tiling splits the matmuls' rows, so the
# results agree to fp32 rounding (STYLE.md §3 defaults).
TOLERANCES = {"loss": {"atol": 1e-6, "rtol": 1e-5}, "grads": {"atol": 1e-5, "rtol": 1e-4}}
NUM_LAYERS = 3
VOCAB = 64


@pytest.fixture(scope="module")
def qlora_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = tmp_path_factory.mktemp("tiny-qwen3")
    build_tiny_qwen3(VOCAB, num_hidden_layers=NUM_LAYERS, hidden_size=64, intermediate_size=128).save_pretrained(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model.train()


def run_step(model, input_ids, offloader=None, tiles=1):
    model.zero_grad()
    context = offloader.offload(model) if offloader is not None else contextlib.nullcontext()
    with context, tile_mlps(model, tiles):
        logits = model(input_ids=input_ids).logits
    loss = torch.log_softmax(logits.float(), dim=-1)[..., :-1, :].gather(-1, input_ids[:, 1:, None]).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_the_model_is_nf4_with_lora(qlora_model):
    layer = qlora_model.base_model.model.model.layers[0]
    assert isinstance(layer.mlp.gate_proj.base_layer, bnb.nn.Linear4bit)
    assert layer.mlp.gate_proj.base_layer.weight.dtype == torch.uint8  # packed NF4
    trainable = [n for n, p in qlora_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("tiles", [1, 3], ids=["untiled", "3 tiles"])
def test_offload_and_tiling_match_plain_checkpointing(qlora_model, tiles):
    input_ids = torch.randint(0, VOCAB, (2, 13))
    expected_loss, expected_grads = run_step(qlora_model, input_ids)
    offloader = CheckpointOffloader()
    loss, grads = run_step(qlora_model, input_ids, offloader, tiles)
    assert offloader.offloaded_count == NUM_LAYERS - 1  # every layer's input but the last went to host buffers
    assert_close(loss, expected_loss, "loss", **TOLERANCES["loss"])
    assert grads.keys() == expected_grads.keys() and len(grads) == 2 * 7 * NUM_LAYERS  # A and B of 7 linears
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], name, **TOLERANCES["grads"])
    offloader.release()
    assert offloader.buffers_in_use == 0


def test_trainer_planner_mode_is_qlora(qlora_model):
    from trl_longctx.longctx_grpo_trainer import _training_mode

    assert _training_mode(qlora_model) == "qlora"
    from testing_utils import build_model

    assert _training_mode(build_model("qwen3", lora=True)) == "lora"
    assert _training_mode(build_model("qwen3", lora=False)) == "full"

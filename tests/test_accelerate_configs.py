"""Every Accelerate config under configs/accelerate parses as Accelerate reads it and names its launch command."""

from pathlib import Path

import pytest
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {
    "single_gpu.yaml": ("NO", None),
    "multi_gpu.yaml": ("MULTI_GPU", None),
    "fsdp2.yaml": ("FSDP", "fsdp_config"),
    "deepspeed_zero2.yaml": ("DEEPSPEED", "deepspeed_config"),
    "deepspeed_zero3.yaml": ("DEEPSPEED", "deepspeed_config"),
}


def test_every_config_is_there():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_as_accelerate_reads_it(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    path = CONFIG_DIR / name
    text = path.read_text()
    launch = f"accelerate launch --config_file configs/accelerate/{name} -m trl_longctx.cli train"
    assert launch in "\n".join(line for line in text.splitlines() if line.startswith("#")), f"{name}: no launch line"
    raw = yaml.safe_load(text)
    distributed_type, section = EXPECTED[name]
    assert raw["distributed_type"] == distributed_type
    config = ClusterConfig.from_yaml_file(path)  # raises on keys Accelerate does not know
    assert config.num_processes >= 1 and config.num_machines == 1 and config.use_cpu is False
    if section is None:
        return
    # `accelerate launch` turns each key of the section into a `--<key>` flag: an unknown one fails at launch time.
    flags = {s for action in launch_command_parser()._actions for s in action.option_strings}
    unknown = sorted(k for k in raw[section] if f"--{k}" not in flags)
    assert not unknown, f"{name}: keys `accelerate launch` does not know: {unknown}"


def test_fsdp2_and_zero_stages():
    load = lambda name: yaml.safe_load((CONFIG_DIR / name).read_text())  # noqa: E731
    assert load("fsdp2.yaml")["fsdp_config"]["fsdp_version"] == 2
    assert load("deepspeed_zero2.yaml")["deepspeed_config"]["zero_stage"] == 2
    assert load("deepspeed_zero3.yaml")["deepspeed_config"]["zero_stage"] == 3

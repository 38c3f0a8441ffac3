"""Every Accelerate config under configs/accelerate parses as Accelerate reads it and names its launch command."""

from pathlib import Path

import pytest
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {
    "single_gpu.yaml": ("NO", None),
    "multi_gpu.yaml": ("MULTI_GPU", None),
    "fsdp2.yaml": ("FSDP", "fsdp_config"),
    "fsdp2_multinode.yaml": ("FSDP", "fsdp_config"),
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
    assert config.num_processes >= 1 and config.use_cpu is False
    if config.num_machines > 1:
        # Every node runs the same number of processes; the others reach the first node at its address and port.
        assert config.num_processes % config.num_machines == 0 and config.machine_rank == 0
        assert config.main_process_ip and config.main_process_port and config.rdzv_backend == "static"
    else:
        assert config.num_machines == 1
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


def test_the_multinode_config_is_fsdp2_over_nodes():
    load = lambda name: yaml.safe_load((CONFIG_DIR / name).read_text())  # noqa: E731
    one, many = load("fsdp2.yaml"), load("fsdp2_multinode.yaml")
    assert many["fsdp_config"] == one["fsdp_config"], "the multi-node config must shard as fsdp2.yaml does"
    assert many["num_machines"] == 2 and many["num_processes"] == 2 * one["num_processes"]
    header = "\n".join(
        line for line in (CONFIG_DIR / "fsdp2_multinode.yaml").read_text().splitlines() if line[:1] == "#"
    )
    assert "--machine_rank" in header and "main_process_ip" in header, "the header must say how each node launches"

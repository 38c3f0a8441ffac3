import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from trl_longctx.tiny_models import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))

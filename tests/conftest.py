import warnings

import pytest
import torch

torch.set_num_threads(1)  # robust when other processes (servers, torchrun) share the cores
warnings.filterwarnings("ignore", message=".*no weights file given.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

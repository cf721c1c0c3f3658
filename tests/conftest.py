import os
import warnings

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", message=".*no weights file given.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

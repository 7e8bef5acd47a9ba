import os

# OpenMP threads spin-wait at barriers by default; on a shared 2-core machine that turns every
# small op into a scheduler tick (measured: 28 s vs 0.4 s for 25 tiny LLaMA steps). Must be set
# before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""Shared test settings: deterministic, single-threaded torch per test process (the suite runs two processes)."""

import os

import pytest
import torch

torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


@pytest.fixture(autouse=True)
def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield

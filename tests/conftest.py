"""Shared test settings: Triton's interpreter on machines without a GPU, one torch thread pool per test process
(the suite runs two processes), no TF32."""

import os
import shutil

# Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before triton (which torch
# may import) is first imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


@pytest.fixture(autouse=True)
def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield

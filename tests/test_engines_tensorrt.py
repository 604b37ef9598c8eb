"""TensorRT engines: built and run only where TensorRT and a CUDA device exist; skipped with the reason elsewhere."""

from __future__ import annotations

import pytest
import torch

from ffclip.engines.tensorrt import fit_problem, tensorrt_reason

REASON = tensorrt_reason(torch.device("cuda"))

HERE = {"tensorrt": "10.9.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_an_engine_fits_only_the_tensorrt_and_gpu_it_was_built_for():
    assert fit_problem(dict(HERE), HERE, "fp16", bf16_supported=True) is None
    assert "tensorrt 10.8.0" in fit_problem({**HERE, "tensorrt": "10.8.0"}, HERE, "fp16", True)
    assert "compute_capability 8.6" in fit_problem({**HERE, "compute_capability": "8.6"}, HERE, "fp32", True)
    assert "built for tensorrt None" in fit_problem({}, HERE, "fp32", True)
    assert "bf16" in fit_problem(dict(HERE), HERE, "bf16", bf16_supported=False)


@pytest.mark.tensorrt
@pytest.mark.skipif(REASON is not None, reason=str(REASON))
def test_tensorrt_export_and_runtime_match_eager(tmp_path):
    from ffclip.export.exporter import ExportOptions, export_artifacts
    from ffclip.factory import build_preset
    from ffclip.runtime import Runtime

    from export_fixtures import TINY

    options = ExportOptions(formats=("onnx", "tensorrt"), min_batch=1, opt_batch=2, max_batch=4,
                            device=torch.device("cuda"))
    report = export_artifacts(build_preset(TINY), tmp_path / "a", options, preset="tiny", sources={})
    assert all(o.status == "built" for o in report.outcomes if o.format == "tensorrt")
    w = torch.randn(6, TINY.mapper.num_ws, 512)
    with Runtime.load(tmp_path / "a", "tensorrt", "cuda") as trt, Runtime.load(tmp_path / "a", "eager", "cuda") as ref:
        assert (trt.synthesize(w) - ref.synthesize(w)).abs().max().item() < 1e-2

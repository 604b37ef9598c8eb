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
        assert (trt.synthesize(w, as_float=True) - ref.synthesize(w, as_float=True)).abs().max().item() < 1e-2


# --- logic that runs without TensorRT, on fake TensorRT and CUDA objects ---

import enum  # noqa: E402
import logging  # noqa: E402
import types  # noqa: E402

from ffclip.artifacts import StageInfo, TensorInfo  # noqa: E402
from ffclip.engines.tensorrt import GraphRunner, io_problems, io_tensors, make_logger, profile_batch  # noqa: E402
from ffclip.export.tensorrt_build import load_timing_cache  # noqa: E402


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT64 = 2


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class ILogger:
    Severity = Severity

    def __init__(self):
        pass


FAKE_TRT = types.SimpleNamespace(ILogger=ILogger, TensorIOMode=TensorIOMode)


def test_a_batch_below_the_profile_minimum_is_padded_up_to_it():
    assert profile_batch(1, 4, 16) == 4
    assert profile_batch(3, 4, 16) == 4
    assert profile_batch(4, 4, 16) == 4
    assert profile_batch(11, 4, 16) == 11
    with pytest.raises(ValueError, match="outside the engine's range 1..16"):
        profile_batch(17, 4, 16)
    with pytest.raises(ValueError):
        profile_batch(0, 4, 16)


class FakeContext:
    def __init__(self):
        self.capturing = False
        self.runs = 0
        self.fail_in_capture = False

    def execute_async_v3(self, stream):
        if self.capturing:
            return not self.fail_in_capture
        self.runs += 1
        return True


class FakeCudart:
    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 2

    def __init__(self, context):
        self.context = context
        self.calls: list[str] = []
        self.live: set[str] = set()
        self.count = 0

    def _new(self, kind):
        self.count += 1
        handle = f"{kind}{self.count}"
        self.live.add(handle)
        return handle

    def cudaStreamBeginCapture(self, stream, mode):
        self.calls.append("begin")
        self.context.capturing = True
        return (0,)

    def cudaStreamEndCapture(self, stream):
        self.calls.append("end")
        self.context.capturing = False
        if self.context.fail_in_capture:
            return 901, None  # the capture was invalidated
        return 0, self._new("graph")

    def cudaGraphInstantiate(self, graph, flags):
        return 0, self._new("exec")

    def cudaGraphDestroy(self, graph):
        self.live.remove(graph)
        return (0,)

    def cudaGraphExecDestroy(self, instance):
        self.live.remove(instance)
        return (0,)

    def cudaGraphLaunch(self, instance, stream):
        assert instance in self.live
        self.calls.append(f"replay {instance}")
        return (0,)

    def cudaGetLastError(self):
        self.calls.append("clear")
        return (0,)


def test_graphs_are_captured_after_a_repeated_batch_and_dropped_when_shapes_change():
    context = FakeContext()
    cudart = FakeCudart(context)
    runner = GraphRunner(context, cudart, enabled=True, name="generator")
    runner.infer(2, stream=7)
    assert cudart.calls == [] and context.runs == 1  # the first run at a shape is TensorRT's shape setup
    runner.infer(2, stream=7)
    assert cudart.calls == ["begin", "end"] and context.runs == 2 and runner.graph_batch == 2
    runner.infer(2, stream=7)
    runner.infer(2, stream=7)
    assert runner.replays == 2 and context.runs == 2
    assert cudart.live == {runner.graph}  # the captured graph was destroyed once instantiated
    runner.shapes_changed()
    assert cudart.live == set() and runner.graph is None
    runner.infer(4, stream=7)
    runner.infer(2, stream=7)  # alternating sizes never capture
    assert context.runs == 4 and runner.graph is None
    runner.drop()


def test_a_failed_capture_is_ended_and_that_batch_size_runs_without_a_graph(caplog):
    context = FakeContext()
    context.fail_in_capture = True
    cudart = FakeCudart(context)
    runner = GraphRunner(context, cudart, enabled=True, name="mapper")
    with caplog.at_level(logging.WARNING, logger="ffclip.tensorrt"):
        for _ in range(4):
            runner.infer(8, stream=1)
    assert context.runs == 4 and runner.replays == 0 and runner.graph is None
    assert cudart.calls == ["begin", "end", "clear"]  # tried once, ended, error cleared, never again
    assert runner.failed == {8} and not cudart.live
    assert "capture of the mapper stage at batch 8 failed" in caplog.text


def test_graphs_stay_off_when_disabled():
    context = FakeContext()
    cudart = FakeCudart(context)
    runner = GraphRunner(context, cudart, enabled=False, name="mapper")
    for _ in range(3):
        runner.infer(1, stream=1)
    assert context.runs == 3 and cudart.calls == []


class FakeEngine:
    def __init__(self, tensors):
        self.tensors = tensors  # name -> (mode, dtype, shape, profile)

    @property
    def num_io_tensors(self):
        return len(self.tensors)

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return self.tensors[name][0]

    def get_tensor_dtype(self, name):
        return self.tensors[name][1]

    def get_tensor_shape(self, name):
        return self.tensors[name][2]

    def get_tensor_profile_shape(self, name, profile):
        assert profile == 0 and self.tensors[name][0] == TensorIOMode.INPUT
        return self.tensors[name][3]


def _stage(min_batch=1, max_batch=8):
    return StageInfo(
        name="mapper", inputs=(TensorInfo("w_plus", "float32", ("batch", 18, 512)),),
        outputs=(TensorInfo("w_edit", "float32", ("batch", 18, 512)),), files={}, min_batch=min_batch, opt_batch=2,
        max_batch=max_batch, precision="fp32", entry={},
    )


def test_tensors_are_read_from_the_engine_and_checked_against_the_manifest():
    engine = FakeEngine({
        "w_plus": (TensorIOMode.INPUT, DataType.FLOAT, (-1, 18, 512), ((1, 18, 512), (2, 18, 512), (8, 18, 512))),
        "w_edit": (TensorIOMode.OUTPUT, DataType.FLOAT, (-1, 18, 512), None),
    })
    found = io_tensors(FAKE_TRT, engine)
    assert [(t.name, t.is_input, t.dtype, t.shape) for t in found] == [
        ("w_plus", True, "float32", (-1, 18, 512)), ("w_edit", False, "float32", (-1, 18, 512))]
    assert found[0].profile[2] == (8, 18, 512)
    assert io_problems(found, _stage()) == []
    assert io_problems(found, _stage(max_batch=16)) == ["w_plus takes batches 1..8, not 1..16"]

    engine.tensors["w_edit"] = (TensorIOMode.OUTPUT, DataType.HALF, (-1, 18, 256), None)
    engine.tensors["extra"] = engine.tensors.pop("w_plus")
    problems = io_problems(io_tensors(FAKE_TRT, engine), _stage())
    assert problems == ["no tensor w_plus", "an unexpected tensor extra", "w_edit is float16, not float32",
                        "w_edit has shape (-1, 18, 256), not ('batch', 18, 512)"]


class FakeBuilderConfig:
    def __init__(self, version):
        self.version = version
        self.set = []

    def create_timing_cache(self, data):
        if data and not data.startswith(b"cache"):
            raise RuntimeError("not a timing cache")
        return data or f"cache-{self.version}".encode()

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        fits = cache == f"cache-{self.version}".encode()
        if fits:
            self.set.append(cache)
        return fits


def test_a_timing_cache_from_another_tensorrt_is_refused_and_replaced():
    lines: list[str] = []
    config = FakeBuilderConfig("10.13")
    assert load_timing_cache(config, b"cache-10.13", lines) == b"cache-10.13" and lines == []
    config = FakeBuilderConfig("11.0")
    assert load_timing_cache(config, b"cache-10.13", lines) == b"cache-11.0"
    assert config.set == [b"cache-11.0"] and "made by another TensorRT version or GPU" in lines[0]
    assert load_timing_cache(FakeBuilderConfig("11.0"), b"garbage", lines) == b"cache-11.0"
    assert "unreadable" in lines[1]
    assert load_timing_cache(FakeBuilderConfig("11.0"), b"", lines) == b"cache-11.0" and len(lines) == 2


def test_the_runtime_logger_shows_warnings_and_the_build_log_keeps_info(caplog):
    with caplog.at_level(logging.DEBUG, logger="ffclip.tensorrt"):
        runtime = make_logger(FAKE_TRT)
        runtime.log(Severity.ERROR, "engine is broken")
        runtime.log(Severity.WARNING, "odd shape")
        runtime.log(Severity.INFO, "loaded")
        runtime.log(Severity.VERBOSE, "details")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "TensorRT: engine is broken"), ("WARNING", "TensorRT: odd shape")]
    lines: list[str] = []
    build = make_logger(FAKE_TRT, lines, Severity.INFO)
    for severity in Severity:
        build.log(severity, severity.name.lower())
    assert lines == ["[INTERNAL_ERROR] internal_error", "[ERROR] error", "[WARNING] warning", "[INFO] info"]

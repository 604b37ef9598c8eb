"""OpenVINO IR of one stage, converted from its exported ONNX file.

The IR keeps float32 weights, except where an int8 export quantizes a stage with NNCF (`ffclip.backends.INT8_MODES`,
calibrated by `ffclip.export.calibration`); the precision a stage computes in is an inference hint recorded in the
manifest and set by the engine when it compiles the model. The mapper computes in f32 whatever the export precision
(the per-stage policy: reduced precision does not keep its output), the other stages in bf16 for a bf16 export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ffclip.backends import QUANTIZATION_MODES, QUANTIZED_PRECISIONS, compute_precision, quantization_mode
from ffclip.engines.openvino import INFERENCE_PRECISIONS, bf16_reason, int8_reason, openvino_reason
from ffclip.export.calibration import calibration_inputs
from ffclip.export.options import ExportOptions
from ffclip.export.stages import StageSpec


def skip_reason(options: ExportOptions) -> str | None:
    """Why the openvino format cannot be built for `options` here (one line), or None when it can."""
    return openvino_skip_reason(options.precision)


def openvino_skip_reason(precision: str) -> str | None:
    """Why the openvino format cannot be built at `precision` here (one line), or None when it can."""
    reason = openvino_reason()
    if reason is not None:
        return reason
    if precision not in INFERENCE_PRECISIONS:
        return (f"OpenVINO on the CPU computes in fp32 or bf16, or quantized to int8, not {precision}; export with "
                "--precision fp32, bf16 or int8")
    refusals = {"bf16": bf16_reason, "int8": int8_reason}
    reason = refusals[precision]() if precision in refusals else None
    if reason is not None:
        return f"{precision} refused: {reason}; export the openvino format with --precision fp32"
    return None


def build(spec: StageSpec, module: nn.Module, folder: Path, options: ExportOptions, entry: dict[str, Any]) -> None:
    """Convert the stage's ONNX file to `openvino/<stage>.xml` and `.bin` (quantized where the policy says, calibrated
    on the stage's own inputs), and record them."""
    xml = folder / "openvino" / f"{spec.name}.xml"
    mode = quantization_mode(spec.name, "openvino", options.precision, "cpu")
    calibration = None if mode is None else calibration_inputs(spec, module, options.calibration_samples)
    facts = export_openvino(folder / entry["files"]["onnx"], xml, spec.name, options.precision, calibration)
    entry["files"]["openvino"] = xml.relative_to(folder).as_posix()
    entry["openvino"] = {**facts, "weights": xml.with_suffix(".bin").relative_to(folder).as_posix()}


def export_openvino(onnx_path: Path, xml_path: Path, stage: str, precision: str,
                    calibration: list[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Convert the ONNX file to `xml_path` (and its `.bin` weights), quantized by the policy's mode for `stage` with
    the `calibration` inputs, and return the manifest's facts about it."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    mode = quantization_mode(stage, "openvino", precision, "cpu")
    if mode is not None:
        if not calibration:
            raise ValueError(f"the {stage} stage is quantized ({mode}) and needs calibration inputs")
        model = quantize(model, mode, calibration)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return {
        "inference_precision": inference_precision(compute_precision(stage, "openvino", precision, "cpu")),
        "quantization": mode,
        "version": ov.get_version(),
    }


def inference_precision(compute: str) -> str:
    """The OpenVINO hint for a stage computing in `compute`. An int8 model computes the operations left in float in
    bf16 where the CPU has it: in f32 they made the quantized generator slower than a bf16 one."""
    if compute in QUANTIZED_PRECISIONS and bf16_reason() is None:
        return INFERENCE_PRECISIONS["bf16"]
    return INFERENCE_PRECISIONS[compute]


def quantize(model: Any, mode: str, calibration: list[dict[str, np.ndarray]]) -> Any:
    """The OpenVINO `model` quantized to int8 by NNCF in `mode` (`ffclip.backends.QUANTIZATION_MODES`): weights alone,
    or weights and activations calibrated on `calibration` with every layer ("full") or all but the first and last
    ("mixed") quantized."""
    import nncf

    if mode == "weights":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use {', '.join(QUANTIZATION_MODES)}")
    layers = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in _LAYER_TYPES
              and op.input_value(1).get_node().get_type_name() in _WEIGHT_SOURCES]
    ignored = nncf.IgnoredScope(names=[layers[0], layers[-1]]) if mode == "mixed" and layers else nncf.IgnoredScope()
    return nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration), ignored_scope=ignored)


# the operations that carry a layer's weights, and what a constant weight reaches them through
_LAYER_TYPES = ("Convolution", "ConvolutionBackpropData", "GroupConvolution", "MatMul")
_WEIGHT_SOURCES = ("Constant", "Convert", "Multiply", "Transpose", "Reshape")

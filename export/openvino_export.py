"""OpenVINO IR of one stage, converted from its exported ONNX file.

The IR keeps float32 weights; the precision a stage computes in is an inference hint recorded in the manifest and set
by the engine when it compiles the model. The mapper computes in f32 whatever the export precision (the per-stage
policy: reduced precision does not keep its output), the other stages in bf16 for a bf16 export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ffclip.backends import compute_precision
from ffclip.engines.openvino import INFERENCE_PRECISIONS, bf16_reason, openvino_reason
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
        return f"OpenVINO on the CPU computes in fp32 or bf16, not {precision}; export with --precision fp32 or bf16"
    if precision == "bf16":
        reason = bf16_reason()
        if reason is not None:
            return f"bf16 refused: {reason}; export the openvino format with --precision fp32"
    return None


def build(spec: StageSpec, module: nn.Module, folder: Path, options: ExportOptions, entry: dict[str, Any]) -> None:
    """Convert the stage's ONNX file to `openvino/<stage>.xml` and `.bin`, and record them."""
    xml = folder / "openvino" / f"{spec.name}.xml"
    facts = export_openvino(folder / entry["files"]["onnx"], xml, spec.name, options.precision)
    entry["files"]["openvino"] = xml.relative_to(folder).as_posix()
    entry["openvino"] = {**facts, "weights": xml.with_suffix(".bin").relative_to(folder).as_posix()}


def export_openvino(onnx_path: Path, xml_path: Path, stage: str, precision: str) -> dict[str, Any]:
    """Convert the ONNX file to `xml_path` (and its `.bin` weights) and return the manifest's facts about it."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return {
        "inference_precision": INFERENCE_PRECISIONS[compute_precision(stage, "openvino", precision, "cpu")],
        "version": ov.get_version(),
    }

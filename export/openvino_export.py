"""OpenVINO IR of one stage, converted from its exported ONNX file.

The IR keeps float32 weights; the precision a stage computes in is an inference hint recorded in the manifest and set
by the engine when it compiles the model. The mapper computes in f32 whatever the export precision (the per-stage
policy: reduced precision does not keep its output), the other stages in bf16 for a bf16 export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ffclip.artifacts import compute_precision
from ffclip.engines.openvino import INFERENCE_PRECISIONS, bf16_reason, openvino_reason


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


def export_openvino(onnx_path: Path, xml_path: Path, stage: str, precision: str) -> dict[str, Any]:
    """Convert the ONNX file to `xml_path` (and its `.bin` weights) and return the manifest's facts about it."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return {
        "inference_precision": INFERENCE_PRECISIONS[compute_precision(stage, precision)],
        "version": ov.get_version(),
    }

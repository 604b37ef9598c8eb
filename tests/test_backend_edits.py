"""Edits from every float32 export of the mapper equal eager's within 3 uint8 levels at batch 8 on the embedded
default preset, where float32 backends used to disagree by up to 255 levels (the generator runs eagerly for all, so
only the mapper's export differs)."""

from __future__ import annotations

import onnxruntime
import torch

from ffclip.checkpoints import load_generator, load_mapper, load_text_encoder
from ffclip.export.onnx_export import export_onnx
from ffclip.export.stages import stage_specs
from ffclip.export.torchscript_export import export_torchscript
from ffclip.imaging import to_uint8


def test_float32_exports_edit_as_eager_does(tmp_path):
    text_encoder, mapper, generator = load_text_encoder(), load_mapper(), load_generator()
    spec = stage_specs(text_encoder, mapper, generator)["mapper"]
    export_onnx(spec, mapper, tmp_path / "mapper.onnx")
    export_torchscript(spec, mapper, tmp_path / "mapper.pt", torch.device("cpu"), torch.float32)
    session = onnxruntime.InferenceSession(str(tmp_path / "mapper.onnx"), providers=["CPUExecutionProvider"])
    traced = torch.jit.load(str(tmp_path / "mapper.pt"))
    with torch.no_grad():
        # latents equal on every layer, as the mapping network gives them
        w = generator.mapping(torch.randn(8, generator.config.style_dim, generator=torch.Generator().manual_seed(1)))
        e = text_encoder.encode(["a small crimson disc"]).expand(8, -1).contiguous()
        edits = {
            "eager": mapper(w, e),
            "onnxruntime": torch.from_numpy(session.run(None, {"w": w.numpy(), "embedding": e.numpy()})[0]),
            "torchscript": traced(w, e),
        }
        images = {name: to_uint8(generator.synthesis(edit)).int() for name, edit in edits.items()}
    for name in ("onnxruntime", "torchscript"):
        assert (images[name] - images["eager"]).abs().max() <= 3, name

"""Crafted checkpoint files (tiny, seeded): legacy torch.save files load through the restricted unpickler, and every
hostile or damaged file is answered with one `CheckpointError` line before anything it declares is allocated."""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ffclip.checkpoints import (load_encoder, load_face_parser, load_generator, load_mapper, load_text_encoder,
                                save_module)
from ffclip.checkpoints.bundle import save_bundle
from ffclip.checkpoints.safe_pickle import load_torch_file
from ffclip.config import MapperConfig
from ffclip.errors import CheckpointError
from ffclip.factory import build_mapper
from reference_models import make_reference_generator, release_mapper_weights, rosinality_checkpoint


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    ref = make_reference_generator(seed=3)
    return rosinality_checkpoint(ref, torch.randn(32, generator=torch.Generator().manual_seed(3)))


def _refused(loader, path, *phrases: str) -> str:
    with pytest.raises(CheckpointError) as info:
        loader(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


class Allocations(TorchDispatchMode):
    """Every tensor an operation returns, seen where PyTorch dispatches it: `largest` is the most bytes of memory
    (not meta) that one of them holds."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


def test_the_allocation_spy_sees_a_module_built_for_real():
    with Allocations() as seen:
        build_mapper(MapperConfig(num_ws=4, dim=512, num_blocks=1))
    assert seen.largest >= 512 * 512 * 4
    with Allocations() as seen, torch.device("meta"):
        build_mapper(MapperConfig(num_ws=4, dim=512, num_blocks=1))
    assert seen.largest == 0


def _with_g_ema(checkpoint: dict, **changes: torch.Tensor) -> dict:
    return {**checkpoint, "g_ema": {**checkpoint["g_ema"], **changes}}


# Legacy (pre-zip) torch.save files.


def test_legacy_file_loads_like_the_zip_format(tmp_path, checkpoint):
    legacy, zipped = tmp_path / "legacy.pt", tmp_path / "zipped.pt"
    opts = {**checkpoint, "args": argparse.Namespace(size=32)}
    torch.save(opts, legacy, _use_new_zipfile_serialization=False)
    torch.save(opts, zipped)
    a, b = load_generator(legacy).state_dict(), load_generator(zipped).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_legacy_file_naming_a_function_runs_nothing(tmp_path, checkpoint):
    marker = tmp_path / "ran"
    path = tmp_path / "legacy.pt"
    torch.save({**checkpoint, "extra": _Payload(str(marker))}, path, _use_new_zipfile_serialization=False)
    _refused(load_generator, path, "os.makedirs is not allowed")
    assert not marker.exists()


class _Storage:
    """A storage reference that `_legacy_file` pickles by persistent id."""

    def __init__(self, numel: int):
        self.numel = numel


class _Tensor:
    def __init__(self, storage: _Storage, size: tuple[int, ...]):
        self.storage, self.size = storage, size

    def __reduce__(self):
        stride = tuple(int(torch.tensor(self.size[i + 1:]).prod()) for i in range(len(self.size)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, stride, False, collections.OrderedDict())


def _legacy_file(obj: object, storage: _Storage, payload: bytes, big_endian: bool = False) -> bytes:
    """The legacy layout by hand: magic, protocol, system info, the object, its storage keys, then each storage."""

    class Writer(pickle.Pickler):
        def persistent_id(self, value):
            if isinstance(value, _Storage):
                return ("storage", torch.FloatStorage, "0", "cpu", value.numel, None)
            return None

    out = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": not big_endian}):
        pickle.dump(head, out, protocol=2)
    Writer(out, protocol=2).dump(obj)
    pickle.dump(["0"], out, protocol=2)
    out.write(struct.pack(">q" if big_endian else "<q", storage.numel) + payload)
    return out.getvalue()


def test_legacy_storage_larger_than_the_file(tmp_path):
    storage = _Storage(numel=8 * 2**30)  # 32 GiB of float32 declared, 16 bytes present
    path = tmp_path / "legacy_bomb.pt"
    path.write_bytes(_legacy_file({"g_ema": {"input.input": _Tensor(storage, (4,))}}, storage, b"\0" * 16))
    _refused(load_generator, path, "more than the file holds")


@pytest.mark.parametrize("big_endian", [False, True])
def test_legacy_storage_written_by_hand_reads_back(tmp_path, big_endian):
    storage = _Storage(numel=4)
    values = torch.arange(4, dtype=torch.float32)
    payload = values.numpy().astype(">f4" if big_endian else "<f4").tobytes()
    path = tmp_path / "legacy_hand.pt"
    path.write_bytes(_legacy_file({"x": _Tensor(storage, (2, 2))}, storage, payload, big_endian))
    assert torch.equal(load_torch_file(path)["x"], values.view(2, 2))


def test_big_endian_zip_reads_back(tmp_path, checkpoint):
    plain, swapped = tmp_path / "plain.pt", tmp_path / "big.pt"
    torch.save(checkpoint, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(swapped, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, dtype="<f4").astype(">f4").tobytes()
            dst.writestr(info, data)
    a, b = load_generator(plain).state_dict(), load_generator(swapped).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# Configurations are checked against bounds and against the tensors present, before anything is allocated.


@pytest.mark.parametrize(
    ("kind", "config", "phrase"),
    [
        ("mapper", {"num_ws": 18, "dim": 2**22, "num_blocks": 4}, "dim"),
        ("mapper", {"num_ws": -1, "dim": 8, "num_blocks": 1}, "num_ws"),
        ("mapper", {"num_ws": 4, "dim": 8, "num_blocks": 10**9}, "num_blocks"),
        ("mapper", {"num_ws": 4, "dim": "8", "num_blocks": 1}, "dim"),
        ("generator", {"resolution": 2**20, "channels": {str(2**i): 8 for i in range(2, 21)}}, "resolution"),
        ("generator", {"resolution": 8, "channels": {"4": 8, "8": 0}}, "channels[8]"),
        ("text_encoder", {"model": "x", "text_cfg": {"width": 2**30, "layers": 1}, "vision_cfg": {}}, "width"),
        ("text_encoder", {"model": "x", "text_cfg": {"hf_model_name": "some/model"}, "vision_cfg": {}}, "hub"),
    ],
)
def test_bundle_config_out_of_bounds(tmp_path, kind, config, phrase):
    from ffclip.checkpoints import load_module

    path = tmp_path / f"{kind}.safetensors"
    save_bundle(path, kind, config, {})
    assert path.stat().st_size < 1024
    _refused(load_module, path, "unusable config", phrase)


def test_bundle_config_larger_than_its_tensors(tmp_path):
    small = build_mapper(MapperConfig(num_ws=4, dim=8, num_blocks=1))
    path = tmp_path / "mapper.safetensors"
    save_bundle(path, "mapper", {"num_ws": 4, "dim": 8192, "num_blocks": 1}, small.state_dict())
    with Allocations() as seen:
        _refused(load_mapper, path, "mismatched shapes", "[8192, 8192]")
    assert seen.largest < 2**20


def test_zero_sized_tensor_claiming_a_huge_width(tmp_path, checkpoint):
    path = tmp_path / "g.pt"
    torch.save(_with_g_ema(checkpoint, **{"input.input": torch.zeros(1, 2**31, 0, 4)}), path)
    _refused(load_generator, path, "unusable config")


def test_zero_sized_tensor_within_bounds_is_not_allocated(tmp_path, checkpoint):
    path = tmp_path / "g.pt"
    torch.save(_with_g_ema(checkpoint, **{"input.input": torch.zeros(1, 8192, 0, 4)}), path)
    with Allocations() as seen:
        _refused(load_generator, path, "mismatched shapes", "synthesis_network.const")
    assert seen.largest < 2**20


def test_an_e4e_file_naming_thousands_of_style_heads_is_refused_before_building(tmp_path):
    path = tmp_path / "e4e.pt"
    state = {"encoder.styles.16383.linear.weight": torch.zeros(1), "encoder.input_layer.0.weight": torch.zeros(1)}
    torch.save({"state_dict": state, "latent_avg": torch.zeros(512), "opts": {}}, path)
    assert path.stat().st_size < 4096
    with Allocations() as seen:
        _refused(load_encoder, path, "unusable config", "n_styles", "16384")
    assert seen.largest < 2**20


@pytest.mark.parametrize("width, fragments", [
    (16384, ("unusable config", "width", "16384")),  # past the limits: refused on the config alone
    (512, ("do not match",)),  # within them: still refused on the tensors before anything is allocated
])
def test_a_face_parser_is_refused_before_any_allocation(tmp_path, width, fragments):
    path = tmp_path / "parsenet.pth"
    torch.save({"conv1.conv1.0.weight": torch.zeros(()).expand(width, 3, 3, 3),
                "final.weight": torch.zeros(()).expand(19, width, 1, 1)}, path)
    assert path.stat().st_size < 4096
    with Allocations() as seen:
        _refused(load_face_parser, path, *fragments)
    assert seen.largest < 2**20


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("conv1.conv.weight", torch.zeros(())),
        ("conv1.noise.weight", torch.zeros(3)),
        ("input.input", torch.zeros(24)),
        ("style.1.weight", torch.zeros(32)),
        ("to_rgb1.bias", torch.zeros(())),
    ],
)
def test_rosinality_wrong_rank(tmp_path, checkpoint, key, value):
    path = tmp_path / "g.pt"
    torch.save(_with_g_ema(checkpoint, **{key: value}), path)
    _refused(load_generator, path, "rosinality")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("attention_layer.k_matrix.weight", torch.zeros(())),
        ("q_matrix.weight", torch.zeros(8)),
        ("gamma_.1.weight", torch.zeros(8, 8)),
    ],
)
def test_release_wrong_rank(tmp_path, key, value):
    blocks = release_mapper_weights(4, 8, num_blocks=1, seed=1)
    blocks[0][key] = value
    state = {f"module.att_mapper.att_mapper.0.{k}": v for k, v in blocks[0].items()}
    path = tmp_path / "release.pt"
    torch.save({"state_dict": state, "opts": {}}, path)
    _refused(load_mapper, path, "FFCLIP release mapper")


def test_broadcast_tensors_cannot_stand_for_a_whole_model(tmp_path):
    """Every tensor a zero-stride view of one stored element: the shapes fit a 256-wide generator of ~20 MB, the file
    stores a few bytes per tensor."""
    from reference_models import RefGenerator

    with torch.random.fork_rng():
        torch.manual_seed(0)
        wide = RefGenerator({4: 256, 8: 256, 16: 256, 32: 256})
    g_ema = {k: v if k.endswith("kernel") else torch.ones(()).expand(v.shape) for k, v in wide.state_dict().items()}
    path = tmp_path / "g.pt"
    torch.save({"g_ema": g_ema, "latent_avg": torch.zeros(32)}, path)
    assert path.stat().st_size < 2**17
    _refused(load_generator, path, "tensors store")


def test_broadcast_tensor_is_never_materialised(tmp_path):
    """A stored 2-byte tensor viewed with zero strides as 2**40 half floats: converting it first would need 4 TiB."""
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"token_embedding.weight": torch.zeros((), dtype=torch.float16).expand(2**20, 2**20)}, path)
    assert path.stat().st_size < 4096
    _refused(load_text_encoder, path, "open_clip checkpoint that does not fit")


# Non-finite weights are refused at load.


def test_nan_generator_bundle(tmp_path):
    from ffclip.config import GeneratorConfig
    from ffclip.factory import build_generator

    generator = build_generator(GeneratorConfig(resolution=8, style_dim=16, n_mlp=1, channels={"4": 8, "8": 8}))
    generator.synthesis_network.blocks[1].conv0.weight.data[0, 0, 0, 0] = float("nan")
    path = tmp_path / "generator.safetensors"
    save_module(path, generator)
    _refused(load_generator, path, "non-finite", "synthesis_network.blocks.1.conv0.weight")


def test_infinite_rosinality_weight(tmp_path, checkpoint):
    weight = checkpoint["g_ema"]["style.2.weight"].clone()
    weight[1, 1] = float("-inf")
    path = tmp_path / "g.pt"
    torch.save(_with_g_ema(checkpoint, **{"style.2.weight": weight}), path)
    _refused(load_generator, path, "non-finite", "mapping_network.layers.1.weight")


def test_nan_mapper_bundle(tmp_path):
    mapper = build_mapper(MapperConfig(num_ws=4, dim=8, num_blocks=1))
    mapper.blocks[0].beta_[3].bias.data[2] = float("nan")
    path = tmp_path / "mapper.safetensors"
    save_module(path, mapper)
    _refused(load_mapper, path, "non-finite", "blocks.0.beta_.3.bias")


# Decompression is bounded by what the declared tensors need.


def _rezip(source, target, replace: dict[str, int]) -> None:
    """Copy a zip archive, writing the entries named in `replace` deflated, with that many zero bytes appended."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename in replace:
                dst.writestr(zipfile.ZipInfo(info.filename), data + bytes(replace[info.filename]), zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, data)


def _data_entries(path) -> list[zipfile.ZipInfo]:
    with zipfile.ZipFile(path) as z:
        return [i for i in z.infolist() if "/data/" in i.filename]


def test_deflate_bomb_is_refused_before_the_big_entry_is_read(tmp_path, checkpoint, monkeypatch):
    plain = tmp_path / "plain.pt"
    torch.save(checkpoint, plain)
    target = _data_entries(plain)[-1].filename
    bomb = tmp_path / "bomb.pt"
    _rezip(plain, bomb, {target: 12 * 2**20})  # 12 MiB of zeros behind a small tensor
    assert bomb.stat().st_size < plain.stat().st_size + 2**17
    opened = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    _refused(load_generator, bomb, "more than its tensor needs")
    assert target not in opened


def test_deflated_entries_of_the_right_size_still_load(tmp_path, checkpoint):
    plain = tmp_path / "plain.pt"
    torch.save(checkpoint, plain)
    deflated = tmp_path / "deflated.pt"
    _rezip(plain, deflated, {i.filename: 0 for i in _data_entries(plain)})
    a, b = load_generator(plain).state_dict(), load_generator(deflated).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pickle_entry_inflating_past_the_limit(tmp_path, checkpoint):
    plain = tmp_path / "plain.pt"
    torch.save(checkpoint, plain)
    with zipfile.ZipFile(plain) as z:
        data_pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
    bomb = tmp_path / "pkl_bomb.pt"
    _rezip(plain, bomb, {data_pkl: 17 * 2**20})
    _refused(load_generator, bomb, "inflates to")

"""Generator checkpoints: rosinality .pt, NVIDIA persistence pickles, bundles and the preset default."""

from __future__ import annotations

import collections
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from ffclip.checkpoints import load_generator, save_module
from ffclip.config import get_preset
from ffclip.errors import CheckpointError
from ffclip.factory import build_generator
from reference_models import SMALL_CHANNELS, make_reference_generator, nvidia_tensors, rosinality_checkpoint


@pytest.fixture(scope="module")
def reference():
    ref = make_reference_generator(seed=1)
    latent_avg = ref.mapping(torch.randn(256, 32, generator=torch.Generator().manual_seed(5))).mean(0)
    return ref, latent_avg


def _assert_matches_reference(generator, ref, latent_avg) -> None:
    torch.manual_seed(3)
    z = torch.randn(3, 32)
    ws = torch.randn(3, ref.num_ws, 32)
    assert (generator.synthesis(ws) - ref.synthesis(ws)).abs().max() <= 1e-5
    for truncation in (1.0, 0.7):
        ours = generator.mapping(z, truncation)
        theirs = ref.mapping(z, truncation, latent_avg)
        assert ours.shape == (3, ref.num_ws, 32)
        assert (ours - theirs[:, None]).abs().max() <= 1e-5


def test_rosinality_layout_with_non_standard_widths(tmp_path, reference):
    ref, latent_avg = reference
    path = tmp_path / "g.pt"
    torch.save(rosinality_checkpoint(ref, latent_avg), path)
    generator = load_generator(path)
    config = generator.config
    assert config.resolution == 32 and config.style_dim == 32 and config.n_mlp == 3
    assert config.channels == {str(r): c for r, c in SMALL_CHANNELS.items()}
    assert not generator.training and not any(p.requires_grad for p in generator.parameters())
    assert torch.equal(generator.w_avg, latent_avg)
    _assert_matches_reference(generator, ref, latent_avg)


def test_rosinality_with_training_args_namespace(tmp_path, reference):
    import argparse

    ref, latent_avg = reference
    path = tmp_path / "g.pt"
    torch.save({**rosinality_checkpoint(ref, latent_avg), "args": argparse.Namespace(size=32, channel=2)}, path)
    _assert_matches_reference(load_generator(path), ref, latent_avg)


def test_rosinality_refuses_a_different_blur_filter(tmp_path, reference):
    ref, latent_avg = reference
    ckpt = rosinality_checkpoint(ref, latent_avg)
    ckpt["g_ema"] = dict(ckpt["g_ema"])
    ckpt["g_ema"]["convs.0.conv.blur.kernel"] = torch.ones(4, 4) / 4
    path = tmp_path / "g.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="convs.0.conv.blur.kernel"):
        load_generator(path)


def _fake_modules(marker: str) -> dict[str, types.ModuleType]:
    """`torch_utils.persistence` and `dnnlib.util` stand-ins that pickle the way NVIDIA's code does."""
    persistence = types.ModuleType("torch_utils.persistence")
    util = types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called by the code under test")

    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class EasyDict(dict):
        pass

    EasyDict.__module__ = util.__name__
    EasyDict.__qualname__ = "EasyDict"
    util.EasyDict = EasyDict

    class Persistent:
        """A network whose pickle embeds source that would create `marker` if executed."""

        def __init__(self, class_name: str, state: dict):
            self.class_name, self.state = class_name, state

        def __reduce__(self):
            meta = dict(
                type="class", version=4, class_name=f"training.networks.{self.class_name}", state=self.state,
                module_src=f"open({marker!r}, 'w').write('executed')\n",
            )
            return _reconstruct_persistent_obj, (meta,)

    persistence.Persistent = Persistent
    return {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
            "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}


def _persistent_tree(mods: dict[str, dict[str, torch.Tensor]], fake: dict) -> object:
    """Nest NVIDIA-layout tensors into persistent objects with nn.Module-like `__dict__` states."""
    Persistent = fake["torch_utils.persistence"].Persistent
    EasyDict = fake["dnnlib.util"].EasyDict
    paths = {""}
    for p in mods:
        parts = p.split(".")
        paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    def parent(p: str) -> str:
        return p.rsplit(".", 1)[0] if "." in p else ""

    built: dict[str, object] = {}
    for path in sorted(paths, key=lambda p: -(p.count(".") + bool(p))):  # deepest first, the root last
        children = collections.OrderedDict((c.rsplit(".", 1)[-1], built[c]) for c in built if c and parent(c) == path)
        params = collections.OrderedDict()
        buffers = collections.OrderedDict()
        for name, value in mods.get(path, {}).items():
            if name in ("noise_const", "resample_filter", "w_avg"):
                buffers[name] = value.clone()
            else:
                params[name] = torch.nn.Parameter(value.clone())
        state = {
            "training": False, "_parameters": params, "_buffers": buffers, "_modules": children,
            "_non_persistent_buffers_set": set(), "_init_kwargs": {"mapping_kwargs": EasyDict(num_layers=3)},
            "weight_gain": np.float64(0.5), "lr_multiplier": 0.01, "architecture": "skip", "conv_clamp": None,
        }
        built[path] = Persistent(path.rsplit(".", 1)[-1] or "Generator", state)
    return built[""]


def _write_nvidia_pickle(path, payload_fn, marker) -> None:
    fake = _fake_modules(str(marker))
    saved = {name: sys.modules.get(name) for name in fake}
    sys.modules.update(fake)
    try:
        with open(path, "wb") as f:
            pickle.dump(payload_fn(fake), f)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_nvidia_pickle_is_read_without_running_its_source(tmp_path, reference):
    ref, latent_avg = reference
    marker = tmp_path / "executed.txt"
    path = tmp_path / "network.pkl"
    mods = nvidia_tensors(ref, latent_avg)
    _write_nvidia_pickle(
        path,
        lambda fake: {"G": _persistent_tree(mods, fake), "G_ema": _persistent_tree(mods, fake),
                      "training_set_kwargs": fake["dnnlib.util"].EasyDict(resolution=32)},
        marker,
    )
    assert b"executed" in path.read_bytes()
    assert "torch_utils.persistence" not in sys.modules
    generator = load_generator(path)
    assert not marker.exists()
    assert generator.config.channels == {str(r): c for r, c in SMALL_CHANNELS.items()}
    assert generator.config.lr_mlp == 0.01
    _assert_matches_reference(generator, ref, latent_avg)

    # The same weights through the rosinality path give the same module.
    ros_path = tmp_path / "g.pt"
    torch.save(rosinality_checkpoint(ref, latent_avg), ros_path)
    from_ros = load_generator(ros_path).state_dict()
    for key, value in generator.state_dict().items():
        assert torch.equal(value, from_ros[key]), key


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_nvidia_pickle_with_a_forbidden_global_is_refused(tmp_path):
    marker = tmp_path / "owned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _Evil(str(marker))}))
    with pytest.raises(CheckpointError, match=r"evil\.pkl.*(posix|os|nt)\.system"):
        load_generator(path)
    assert not marker.exists()


def test_bundle_round_trip_and_preset_default(tmp_path, reference):
    ref, latent_avg = reference
    src = tmp_path / "g.pt"
    torch.save(rosinality_checkpoint(ref, latent_avg), src)
    path = tmp_path / "g.safetensors"
    save_module(path, load_generator(src))
    _assert_matches_reference(load_generator(path, device="cpu"), ref, latent_avg)

    default = load_generator(preset="random")
    p = get_preset("random")
    expected = build_generator(p.generator, p.seed + 2)
    for key, value in expected.state_dict().items():
        assert torch.equal(value, default.state_dict()[key]), key

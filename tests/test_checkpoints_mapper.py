"""Mapper checkpoints: FFCLIP's released layout (with its bundled generator), bundles and the preset default."""

from __future__ import annotations

import argparse
import copy
import inspect

import pytest
import torch

from ffclip.checkpoints import extract_generator, load_generator, load_mapper, save_module
from ffclip.models import Generator
from reference_models import make_reference_generator, mapper_blocks, ref_mapper, release_mapper_weights

NUM_WS, DIM = 8, 32  # the reference generator: 32 px, style size 32


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    ref = make_reference_generator(seed=2)
    blocks = release_mapper_weights(NUM_WS, DIM, seed=4)
    state = {f"module.att_mapper.att_mapper.{i}.{k}": v for i, p in enumerate(blocks) for k, v in p.items()}
    state.update({f"module.generator.{k}": v for k, v in ref.state_dict().items()})
    path = tmp_path_factory.mktemp("release") / "best_model.pt"
    torch.save({"state_dict": state, "opts": argparse.Namespace(lr=5e-4, batch_size=8)}, path)
    return path, blocks, ref


def _assert_matches_reference(mapper, blocks) -> None:
    """Compared in float64: with random weights the stack is ill-conditioned in float32 (the LayerNorm of the
    nearly constant channel-attention output amplifies rounding about a hundredfold, so even the reference's own
    float32 and float64 results differ by ~1e-4), which would hide nothing but make a float32 bound meaningless."""
    torch.manual_seed(0)
    w = torch.randn(3, mapper.config.num_ws, mapper.config.dim, dtype=torch.float64)
    e = torch.randn(3, mapper.config.dim, dtype=torch.float64)
    blocks64 = [{k: v.double() for k, v in p.items()} for p in blocks]
    assert (copy.deepcopy(mapper).double()(w, e) - ref_mapper(blocks64, w, e)).abs().max() <= 1e-9


def test_release_mapper_matches_design_reference(release_file):
    path, blocks, _ = release_file
    mapper = load_mapper(path)
    assert (mapper.config.num_ws, mapper.config.dim, mapper.config.num_blocks) == (NUM_WS, DIM, 4)
    assert not mapper.training and not any(p.requires_grad for p in mapper.parameters())
    assert next(mapper.parameters()).dtype == torch.float32
    _assert_matches_reference(mapper, blocks)


def test_release_generator_is_extracted(release_file):
    path, _, ref = release_file
    with pytest.warns(UserWarning, match="w_avg was estimated"):
        generator = extract_generator(path)
    with pytest.warns(UserWarning, match="w_avg was estimated"):
        generator_again = load_generator(path)
    ws = torch.randn(2, NUM_WS, DIM, generator=torch.Generator().manual_seed(1))
    assert (generator.synthesis(ws) - ref.synthesis(ws)).abs().max() <= 1e-5
    assert torch.equal(generator.synthesis(ws), generator_again.synthesis(ws))
    # the estimate is a sample mean of the mapping network's output: it must lie within 6 standard errors (of both
    # samples together) of the reference mapping network's mean over another 16384 seeded z, in every channel
    samples = inspect.signature(Generator.estimate_w_avg).parameters["num_samples"].default
    w = ref.style(torch.randn(16384, DIM, generator=torch.Generator().manual_seed(7)))
    bound = 6 * w.std(dim=0) * (1 / samples + 1 / len(w)) ** 0.5
    assert ((generator.w_avg - w.mean(dim=0)).abs() <= bound).all()


def test_mapper_bundle_round_trip_and_preset_default(tmp_path, release_file):
    path, blocks, _ = release_file
    bundle = tmp_path / "mapper.safetensors"
    save_module(bundle, load_mapper(path))
    _assert_matches_reference(load_mapper(bundle), blocks)

    # the seeded default: the released maths, fitting the preset's generator, the same weights on every load
    default = load_mapper(preset="random")
    _assert_matches_reference(default, mapper_blocks(default))
    assert default.num_ws == load_generator(preset="random").num_ws
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), load_mapper(preset="random").parameters()))

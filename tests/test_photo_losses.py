"""FFCLIP's identity and background losses against plain re-statements of its code, in float64.

The networks inside the losses are held to their references in test_photo_nets.py; small stand-ins take their place
here (a unit-norm linear embedding, a per-pixel classifier that calls bright-red pixels hair).
"""

from __future__ import annotations

import pytest
import torch

from ffclip.photo_losses import HAIR_CLASS, background_loss, background_mask, face_crop, identity_loss
from reference_photo_models import ref_background_loss, ref_identity_loss


def images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


class Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.map = torch.nn.Parameter(torch.randn(3 * 16, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        assert faces.shape[1:] == (3, 112, 112)
        x = torch.nn.functional.adaptive_avg_pool2d(faces, 4).flatten(1) @ self.map
        return x / x.norm(dim=1, keepdim=True)


def parse(images: torch.Tensor) -> torch.Tensor:
    """19 class logits per pixel: hair where the red channel is above 0.5, class 0 elsewhere."""
    assert images.shape[-1] == 512
    logits = torch.zeros(images.shape[0], 19, *images.shape[-2:], dtype=images.dtype)
    logits[:, HAIR_CLASS] = images[:, 0] - 0.5
    return logits


@pytest.mark.parametrize("size", [1024, 256, 64])
def test_identity_loss_is_ffclips(size):
    net = Embed()
    edited, original = images(3, size, 2), images(3, size, 3)
    ours = identity_loss(net, edited, original)
    assert torch.allclose(ours, ref_identity_loss(net, edited, original), rtol=1e-12, atol=0)
    assert identity_loss(net, original, original).abs() < 1e-12
    ours.backward()
    assert net.map.grad is not None and net.map.grad.abs().sum() > 0


def test_identity_loss_has_no_gradient_through_the_original():
    edited, original = images(2, 256, 4).requires_grad_(), images(2, 256, 5).requires_grad_()
    identity_loss(Embed(), edited, original).backward()
    assert original.grad is None and edited.grad.abs().sum() > 0
    assert face_crop(original).shape == (2, 3, 112, 112)


@pytest.mark.parametrize("size", [1024, 256])
def test_background_loss_is_ffclips(size):
    original = images(2, size, 6)
    edited = (original + 0.3 * images(2, size, 7)).clamp(-1, 1)
    ours = background_loss(parse, edited, original)
    assert torch.allclose(ours, ref_background_loss(parse, edited, original, size), rtol=1e-12, atol=0)
    mask = background_mask(parse, original)
    assert mask.shape == (2, 1, size, size) and 0 < mask.mean() < 1


def test_background_loss_ignores_hair_only_changes():
    original = images(1, 512, 8)
    hair = original[:, :1] > 0.5
    edited = torch.where(hair & (original[:, 1:2] > 0), -original, original)  # hair pixels change, red channel kept
    edited[:, 0] = original[:, 0]
    assert background_loss(parse, edited, original) == 0
    assert background_loss(parse, original.flip(-1), original) > 0

"""The full FFCLIP losses in the trainer, the released defaults, the embedding loss's resize, and validation that keeps
the best mapper (tiny models; small stand-ins for the identity net and the face parser)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_training import tiny_trainer

from ffclip.checkpoints.bundle import load_bundle
from ffclip.errors import InputError
from ffclip.photo_losses import HAIR_CLASS, background_loss, identity_loss
from ffclip.training import ClipImageEmbedder, TrainConfig, prompt_set


class Embed(torch.nn.Module):
    """A unit-norm linear embedding of 112 px faces, standing in for ArcFace."""

    def __init__(self):
        super().__init__()
        self.map = torch.nn.Parameter(torch.randn(3 * 16, 32, generator=torch.Generator().manual_seed(1)))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(faces, 4).flatten(1) @ self.map
        return x / x.norm(dim=1, keepdim=True)


class Parse(torch.nn.Module):
    """19 class logits per pixel, hair where the red channel is above 0, standing in for the face parser."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(images.shape[0], 19, *images.shape[-2:], dtype=images.dtype)
        logits[:, HAIR_CLASS] = images[:, 0]
        return logits


def test_defaults_are_the_released_configuration():
    c = TrainConfig()
    assert (c.lambda_latent, c.lambda_embedding, c.lambda_identity, c.lambda_background, c.lambda_clip) == (
        1.6, 1.0, 0.9, 2.0, 1.0)
    assert (c.lr, c.batch_size, c.grad_clip, c.decay_at, c.decay_factor) == (5e-4, 8, 5.0, (0.5, 0.75, 0.9, 0.95), 0.5)
    assert c.embedding_resize == "bicubic"


def test_the_released_prompt_set_is_packaged_with_its_weighting():
    released = prompt_set("released")
    assert len(released) == 53 and released.count("Sad") == 2 and released.count("wearing glasses") == 2
    assert {"happy", "Man Aged 80", "Blond hair", "Green eyes", "make up", "Bob Cut hairstyle"} <= set(released)
    assert "blond hair" in prompt_set("faces")
    with pytest.raises(InputError, match="released"):
        prompt_set("celebrities")


def test_identity_and_background_losses_join_the_total_and_train_the_mapper():
    trainer = tiny_trainer(steps=2, lr=1e-2, lambda_clip=0.0, lambda_latent=0.0, lambda_embedding=0.0,
                           lambda_identity=0.9, lambda_background=2.0, dtype="float64")
    trainer.identity_net, trainer.face_parser = Embed().double().requires_grad_(False), Parse()
    w, e = trainer._batch()
    total, values = trainer._losses(w, e, trainer.mapper)
    with torch.no_grad():
        x, x_hat = trainer.generator.synthesis(w), trainer.generator.synthesis(trainer.mapper(w, e))
    clip, latent, embedding, reported_total, identity, background = values.tolist()
    assert identity == pytest.approx(identity_loss(trainer.identity_net, x_hat, x).item(), rel=1e-12) and identity > 0
    assert background == pytest.approx(background_loss(trainer.face_parser, x_hat, x).item(), rel=1e-12)
    assert background > 0
    assert total.item() == pytest.approx(0.9 * identity + 2.0 * background, rel=1e-12) == reported_total
    before = {k: v.clone() for k, v in trainer.mapper.state_dict().items()}
    trainer.train_step()
    assert any(not torch.equal(v, trainer.mapper.state_dict()[k]) for k, v in before.items())
    assert trainer.history[-1].identity > 0 and trainer.history[-1].background > 0


def test_without_their_networks_the_identity_and_background_losses_are_off():
    losses = tiny_trainer(steps=1).train_step()
    assert losses.identity == losses.background == 0.0
    assert losses.total == pytest.approx(1.0 * losses.clip + 1.6 * losses.latent + 1.0 * losses.embedding, rel=1e-5)


def test_the_embedding_loss_resizes_bicubically_and_the_clip_loss_with_antialiasing():
    trainer = tiny_trainer(steps=1)
    assert (trainer.image_embedder.resize, trainer.embedding_embedder.resize) == ("antialiased", "bicubic")
    size = trainer.image_embedder.size
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    x = (images + 1) / 2
    bicubic = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)
    normalised = (bicubic - trainer.image_embedder.mean) / trainer.image_embedder.std
    with torch.no_grad():
        assert torch.allclose(trainer.embedding_embedder(images), trainer.image_embedder.visual(normalised), atol=1e-5)
        assert not torch.allclose(trainer.embedding_embedder(images), trainer.image_embedder(images), atol=1e-3)
        at_size = F.interpolate(images, size=(size, size), mode="nearest")
        assert torch.allclose(trainer.embedding_embedder(at_size), trainer.image_embedder(at_size), atol=1e-5)
    same = tiny_trainer(steps=1, embedding_resize="antialiased")
    assert same.embedding_embedder is same.image_embedder
    with pytest.raises(InputError, match="bicubic"):
        ClipImageEmbedder(trainer.text_encoder, "nearest")


def test_validation_keeps_the_best_mapper_across_a_resume(tmp_path, monkeypatch):
    def trainer_scoring(steps, scores):
        trainer = tiny_trainer(steps=steps, held_out=1, val_every=1, save_every=100)
        weights = {}

        def validate():
            weights[trainer.step] = {k: v.clone() for k, v in trainer.mapper.state_dict().items()}
            return scores.pop(0)

        monkeypatch.setattr(trainer, "validate", validate)
        return trainer, weights

    trainer, weights = trainer_scoring(2, [3.0, 1.0])
    trainer.fit(tmp_path)
    best = load_bundle(tmp_path / "best_mapper.safetensors")
    assert (best.extra["trained_steps"], best.extra["val_loss"], trainer.best_validation) == (2, 1.0, (2, 1.0))
    assert all(torch.equal(v, best.state_dict[k]) for k, v in weights[2].items())

    resumed, _ = trainer_scoring(4, [1.5, 0.5])
    resumed.resume(tmp_path)
    assert resumed.validation == [(1, 3.0), (2, 1.0)]
    resumed.train_step()
    resumed._keep_if_best(tmp_path)
    assert load_bundle(tmp_path / "best_mapper.safetensors").extra["trained_steps"] == 2
    resumed.train_step()
    resumed._keep_if_best(tmp_path)
    assert load_bundle(tmp_path / "best_mapper.safetensors").extra["trained_steps"] == 4


def test_validation_scores_fixed_pairs_and_needs_held_out_latents():
    trainer = tiny_trainer(steps=1, held_out=2, prompts=("blond hair", "a smiling face", "wearing glasses"))
    first = trainer.validate()
    assert first == trainer.validate() and first > 0 and trainer.mapper.training
    with pytest.raises(InputError, match="held-out latents"):
        tiny_trainer(val_every=5)

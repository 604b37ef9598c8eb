"""The mapper training loop on tiny models: it learns, leaves the frozen stages alone, saves and resumes."""

import os

import pytest
import torch

from export_fixtures import TINY

from ffclip.checkpoints.bundle import load_module
from ffclip.config import GeneratorConfig, MapperConfig
from ffclip.errors import InputError
from ffclip.factory import build_generator, build_mapper, build_text_encoder
from ffclip.training import MapperTrainer, StepLosses, TrainConfig, plot_losses, step_decay

TINY_CLIP = TINY.text


def tiny_trainer(steps=12, held_out=0, **overrides):
    generator = build_generator(GeneratorConfig(resolution=16, style_dim=512, n_mlp=2,
                                                channels={"4": 16, "8": 12, "16": 8}), seed=1)
    text = build_text_encoder(TINY_CLIP, seed=2, vision=True)
    mapper = build_mapper(MapperConfig(num_ws=generator.num_ws), seed=3)
    latents = generator.mapping(torch.randn(2, 512, generator=torch.Generator().manual_seed(4)), 0.7)
    settings = {"steps": steps, "batch_size": 2, "save_every": 5, "prompts": ("blond hair",), **overrides}
    config = TrainConfig(**settings)
    return MapperTrainer(mapper, generator, text, config, latents=latents,
                         val_latents=latents[:held_out] if held_out else None)


def test_step_decay_points():
    assert [step_decay(s, 100, (0.5, 0.75, 0.9, 0.95), 0.1) for s in (0, 49, 50, 75, 90, 95, 99)] == pytest.approx(
        [1, 1, 0.1, 0.01, 1e-3, 1e-4, 1e-4]
    )


def test_training_lowers_the_clip_loss_and_touches_only_the_mapper():
    trainer = tiny_trainer(steps=15, lr=1e-2, decay_at=(), lambda_latent=0.0, lambda_embedding=0.0)
    frozen = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    frozen_text = {k: v.clone() for k, v in trainer.text_encoder.state_dict().items()}
    before = {k: v.clone() for k, v in trainer.mapper.state_dict().items()}
    for _ in range(15):
        trainer.train_step()
    first, last = trainer.history[0].clip, trainer.history[-1].clip
    assert last < first - 1e-3, (first, last)
    assert all(torch.equal(v, trainer.generator.state_dict()[k]) for k, v in frozen.items())
    assert all(torch.equal(v, trainer.text_encoder.state_dict()[k]) for k, v in frozen_text.items())
    assert any(not torch.equal(v, trainer.mapper.state_dict()[k]) for k, v in before.items())


def test_save_resume_and_plot(tmp_path):
    trainer = tiny_trainer(steps=6)
    path = trainer.fit(tmp_path)
    saved = load_module(path, expect_kind="mapper")
    assert all(torch.equal(v, trainer.mapper.state_dict()[k]) for k, v in saved.state_dict().items())
    resumed = tiny_trainer(steps=8)
    resumed.resume(tmp_path)
    assert resumed.step == 6 and len(resumed.history) == 6
    resumed.fit(tmp_path)
    assert resumed.step == 8
    png = plot_losses(resumed.history, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_needs_prompts_and_an_image_tower():
    with pytest.raises(InputError, match="no training prompts"):
        tiny_trainer(prompts=())
    trainer = tiny_trainer()
    trainer.text_encoder.drop_vision()
    with pytest.raises(InputError, match="image tower"):
        MapperTrainer(trainer.mapper, trainer.generator, trainer.text_encoder, trainer.config)


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight = tiny_trainer(steps=8)
    straight.fit(tmp_path / "straight")
    first = tiny_trainer(steps=8)
    for _ in range(4):
        first.train_step()
    first.save(tmp_path / "split")
    second = tiny_trainer(steps=8)
    second.resume(tmp_path / "split")
    second.fit(tmp_path / "split")
    assert [h.total for h in second.history] == pytest.approx([h.total for h in straight.history], rel=1e-5)


def test_a_crash_during_a_save_leaves_a_step_that_resumes(tmp_path, monkeypatch):
    """A save killed at its first or its second file rename (inside or between its writes) leaves a folder that
    resumes at a step it saved, with that step's mapper weights."""
    trainer = tiny_trainer(steps=4)
    weights = {}
    real_replace = os.replace

    def save(crash_at: int | None) -> None:
        with torch.no_grad():  # a stand-in for a training step, which only slows the test down
            for parameter in trainer.mapper.parameters():
                parameter.add_(torch.randn_like(parameter))
        trainer.step += 1
        trainer.history.append(StepLosses(trainer.step, 0.0, 0.0, 0.0))
        weights[trainer.step] = {k: v.clone() for k, v in trainer.mapper.state_dict().items()}
        renames = []

        def dying_replace(src, dst):
            if len(renames) == crash_at:
                raise KeyboardInterrupt("killed")
            renames.append(dst)
            real_replace(src, dst)

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", dying_replace)
            if crash_at is None:
                trainer.save(tmp_path)
            else:
                with pytest.raises(KeyboardInterrupt):
                    trainer.save(tmp_path)
        (tmp_path / f".train_state.pt.left-by-a-kill-{trainer.step}.tmp").write_bytes(b"PK\x03\x04 half a file")

    resumed = tiny_trainer(steps=4)
    save(None)
    for crash_at in (0, 1):
        save(crash_at)
        resumed.resume(tmp_path)
        assert resumed.step in weights and len(resumed.history) == resumed.step
        assert all(torch.equal(v, resumed.mapper.state_dict()[k]) for k, v in weights[resumed.step].items())
        assert [h.clip for h in resumed.history] == list(range(1, resumed.step + 1))
    resumed.save(tmp_path)
    saved = load_module(tmp_path / "mapper.safetensors", expect_kind="mapper")
    assert all(torch.equal(v, resumed.mapper.state_dict()[k]) for k, v in saved.state_dict().items())


def test_resume_from_a_folder_an_earlier_version_wrote(tmp_path):
    """Earlier saves: the mapper only in mapper.safetensors, train_state.pt without it; usable when the steps agree."""
    trainer = tiny_trainer(steps=4)
    for _ in range(3):
        trainer.train_step()
    trainer.save(tmp_path)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    for key in ("format", "mapper", "mapper_config"):
        del state[key]
    torch.save(state, tmp_path / "train_state.pt")
    resumed = tiny_trainer(steps=4)
    resumed.resume(tmp_path)
    assert resumed.step == 3
    assert all(torch.equal(v, resumed.mapper.state_dict()[k]) for k, v in trainer.mapper.state_dict().items())
    state["step"] = 2
    torch.save(state, tmp_path / "train_state.pt")
    with pytest.raises(InputError, match="half-written"):
        resumed.resume(tmp_path)


def test_resume_refuses_a_damaged_state_in_one_line(tmp_path):
    trainer = tiny_trainer(steps=2)
    trainer.save(tmp_path)
    data = (tmp_path / "train_state.pt").read_bytes()
    (tmp_path / "train_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        trainer.resume(tmp_path)
    assert "train_state.pt" in str(info.value) and "\n" not in str(info.value)


def test_training_checks_that_the_stages_fit():
    trainer = tiny_trainer()
    wrong = build_mapper(MapperConfig(num_ws=trainer.generator.num_ws + 2), seed=0)
    with pytest.raises(InputError, match="style layers"):
        MapperTrainer(wrong, trainer.generator, trainer.text_encoder, trainer.config)

"""The world's trained vocabulary: which words of a prompt the world's text encoder never saw."""

from __future__ import annotations

import random
from pathlib import Path

from ffclip.world import captions
from ffclip.world.scenes import ATTRIBUTES, Scene, values
from ffclip.world.vocabulary import is_world_text_encoder, seen_vocabulary, unseen_words


def test_everything_training_says_is_seen():
    assert all(unseen_words(prompt) == [] for prompt, _, _ in captions.all_edit_prompts("seen"))
    rng = random.Random(0)
    choices = {a: values(a) for a in ATTRIBUTES}
    for _ in range(300):
        scene = Scene(**{a: rng.choice(v) for a, v in choices.items()})
        assert unseen_words(captions.caption(scene, rng)[0]) == []


def test_words_only_held_out_phrasings_use_are_unseen():
    held_out = {w for p, _, _ in captions.all_edit_prompts("held-out") for w in unseen_words(p)}
    assert {"paint", "please", "recolour", "reshape", "instead"} <= held_out
    assert "backdrop" in seen_vocabulary() and "backdrop" not in held_out


def test_unseen_words_are_lowercase_in_order_once_without_punctuation():
    assert unseen_words("Make it ORANGE, orange... and Tall!") == ["orange", "and", "tall"]
    assert unseen_words("  ") == []
    assert unseen_words("An emerald DISC; on grey.") == []


def test_only_the_world_presets_own_text_encoder_has_the_list():
    assert is_world_text_encoder("world", None)
    assert not is_world_text_encoder("world", Path("ViT-B-32.safetensors"))
    assert not is_world_text_encoder("random", None)
    assert not is_world_text_encoder("ffhq-1024", None)
    assert not is_world_text_encoder("no-such-preset", None)

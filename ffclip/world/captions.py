"""Words for the shapes world: scene captions and edit prompts in many templates and synonyms.

Templates are split once: the "seen" ones are the only phrasings any stage trains on; the "held-out" ones are kept
for measuring whether edits follow phrasings never seen. Synonyms are shared by both (a word never seen in
training cannot carry meaning). Slots: {color}, {shape}, {size}, {background} and {thing} (a generic noun).
"""

from __future__ import annotations

import random
import re

from .scenes import ATTRIBUTES, Scene

SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "red": ("red", "crimson", "scarlet"),
        "green": ("green", "emerald", "grassy green"),
        "blue": ("blue", "cobalt", "azure"),
        "yellow": ("yellow", "golden", "lemon"),
        "magenta": ("magenta", "fuchsia", "purple"),
        "cyan": ("cyan", "turquoise", "aqua"),
        "white": ("white", "snowy", "ivory"),
    },
    "shape": {
        "circle": ("circle", "disc", "disk", "round dot"),
        "square": ("square", "box", "block"),
        "triangle": ("triangle", "pyramid", "wedge"),
    },
    "size": {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")},
    "background": {"black": ("black", "dark", "pitch black"), "gray": ("gray", "grey", "silver")},
}
THINGS = ("shape", "object", "thing", "figure")

SEEN_CAPTIONS = (
    "a {size} {color} {shape} on {background}",
    "a {size} {color} {shape} on a {background} background",
    "{size} {color} {shape}, {background} background",
    "a picture of a {size} {color} {shape} against {background}",
    "there is a {size} {color} {shape} on a {background} backdrop",
    "a {color} {shape} on {background}",
    "a {size} {shape} on a {background} background",
    "a {size} {color} {thing}",
    "a {color} {shape}",
    "a {size} {shape}",
    "a {color} {thing} on {background}",
    "a {shape} on a {background} background",
)
HELD_OUT_CAPTIONS = (
    "an image showing one {size} {color} {shape}, the background {background}",
    "{background} behind a {size} {color} {shape}",
)

SEEN_EDITS: dict[str, tuple[str, ...]] = {
    "color": ("make it {color}", "a {color} {thing}", "{color}", "the {thing} is {color}", "turn it {color}",
              "change the colour to {color}", "something {color}", "now {color}"),
    "shape": ("turn it into a {shape}", "a {shape}", "{shape}", "make it a {shape}", "it is a {shape}",
              "change the shape to a {shape}", "now a {shape}", "the {thing} is a {shape}"),
    "size": ("make it {size}", "a {size} {thing}", "{size}", "the {thing} is {size}", "now {size}",
             "change the size to {size}", "something {size}", "a {size} one"),
    "background": ("make the background {background}", "on a {background} background", "{background} background",
                   "the background is {background}", "on {background}", "change the background to {background}",
                   "a {thing} on a {background} backdrop", "now on {background}"),
}
HELD_OUT_EDITS: dict[str, tuple[str, ...]] = {
    "color": ("paint the {thing} {color}", "i want it in {color}", "{color} please", "recolour it {color}"),
    "shape": ("reshape it as a {shape}", "i want a {shape} instead", "a {shape} please", "let it become a {shape}"),
    "size": ("scale it to {size}", "i want it {size}", "{size} please", "let it become {size}"),
    "background": ("put it on {background}", "i want a {background} backdrop", "{background} behind it please",
                   "set the backdrop to {background}"),
}

SPLITS = ("seen", "held-out")


def _slots(template: str) -> set[str]:
    return set(re.findall(r"\{(\w+)\}", template))


def fill(template: str, values: dict[str, str], rng: random.Random) -> str:
    """`template` with each attribute slot filled by a random synonym of its value and {thing} by a generic noun."""
    words = {a: rng.choice(SYNONYMS[a][v]) for a, v in values.items() if a in ATTRIBUTES}
    words["thing"] = rng.choice(THINGS)
    return _articles(template.format(**{k: words[k] for k in _slots(template)}))


def _articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown phrasing split {split!r}; use one of {SPLITS}")


def caption(scene: Scene, rng: random.Random, split: str = "seen") -> tuple[str, frozenset[str]]:
    """A random caption of `scene` and the attributes it mentions (the others are left open): half of them describe
    the scene, half use one attribute's edit phrasings."""
    _check_split(split)
    captions, edits = (SEEN_CAPTIONS, SEEN_EDITS) if split == "seen" else (HELD_OUT_CAPTIONS, HELD_OUT_EDITS)
    template = rng.choice(captions) if rng.random() < 0.5 else rng.choice(edits[rng.choice(ATTRIBUTES)])
    mentioned = frozenset(_slots(template) & set(ATTRIBUTES))
    return fill(template, scene.attributes, rng), mentioned


def edit_prompt(attribute: str, value: str, rng: random.Random, split: str = "seen") -> str:
    """A random request to set `attribute` to `value`, in a template of `split`."""
    _check_split(split)
    templates = (SEEN_EDITS if split == "seen" else HELD_OUT_EDITS)[attribute]
    return fill(rng.choice(templates), {attribute: value}, rng)


def all_edit_prompts(split: str = "seen") -> list[tuple[str, str, str]]:
    """Every (prompt, attribute, value) of `split`: each template with each synonym of each value."""
    _check_split(split)
    out = []
    for attribute, templates in (SEEN_EDITS if split == "seen" else HELD_OUT_EDITS).items():
        for template in templates:
            for value, synonyms in SYNONYMS[attribute].items():
                for word in synonyms:
                    things = THINGS if "thing" in _slots(template) else THINGS[:1]
                    for thing in things:
                        text = template.format(**{attribute: word, "thing": thing})
                        out.append((_articles(text), attribute, value))
    return list(dict.fromkeys(out))


def balanced_edit_prompts() -> list[str]:
    """The seen edit prompts, each attribute's repeated to an equal share: a trainer that draws lines uniformly then
    asks for every attribute equally often (colour has the most words and would otherwise crowd out the rest)."""
    by_attribute: dict[str, list[str]] = {}
    for prompt, attribute, _ in all_edit_prompts("seen"):
        by_attribute.setdefault(attribute, []).append(prompt)
    share = max(len(p) for p in by_attribute.values())
    return [p for prompts in by_attribute.values() for p in (prompts * share)[:share]]


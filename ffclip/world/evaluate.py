"""The world's numbers, measured by the judge: valid originals, edit accuracy and preservation, per phrasing split.

Works on anything with `sample_latents(num, seed, truncation)` and `edit(latents, prompts)` (uint8 pictures): the
eager `EditPipeline` and the exported `Runtime` alike, so every backend is judged on meaning.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import InputError
from .captions import SPLITS, edit_prompt
from .judge import judge
from .scenes import ATTRIBUTES, resolution, values


class Editor(Protocol):
    """What the judge needs of an editor: `EditPipeline` and `Runtime` both are one."""

    @property
    def resolution(self) -> int: ...

    def sample_latents(self, num: int, seed: int = 0, truncation: float = 1.0) -> torch.Tensor: ...

    def synthesize(self, latents: torch.Tensor) -> torch.Tensor: ...  # uint8 [B, R, R, 3], as `edit`

    def edit(self, latents: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor: ...


@dataclass
class WorldScores:
    """Fractions in [0, 1] of the edits of valid originals. `accuracy[split][attribute]`: the edit is a valid scene
    with the asked value; `preserved[split][attribute]`: the edit is a valid scene that kept the other three."""

    originals: int
    valid: float
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    preserved: dict[str, dict[str, float]] = field(default_factory=dict)

    def mean_accuracy(self, split: str) -> float:
        return sum(self.accuracy[split].values()) / len(ATTRIBUTES)

    def mean_preserved(self, split: str) -> float:
        return sum(self.preserved[split].values()) / len(ATTRIBUTES)

    def table(self) -> str:
        """A Markdown table of the scores, in percent."""
        lines = [f"valid originals: {100 * self.valid:.1f}% of {self.originals}", "",
                 "| phrasings | edit | " + " | ".join(ATTRIBUTES) + " | mean |",
                 "|---|---|" + "---|" * (len(ATTRIBUTES) + 1)]
        for split in self.accuracy:
            for name, scores, mean in (("accuracy", self.accuracy, self.mean_accuracy),
                                       ("preserved", self.preserved, self.mean_preserved)):
                cells = " | ".join(f"{100 * scores[split][a]:.1f}" for a in ATTRIBUTES)
                lines.append(f"| {split} | {name} | {cells} | {100 * mean(split):.1f} |")
        return "\n".join(lines)


def evaluate(editor: Editor, num: int = 128, seed: int = 0, truncation: float = 1.0,
             splits: tuple[str, ...] = SPLITS, on_progress: Callable[[str], None] | None = None) -> WorldScores:
    """Judge `num` seeded originals, then edit every valid one once per attribute and split, towards a value it
    does not have, in a phrasing drawn from that split."""
    latents = editor.sample_latents(num, seed, truncation)
    first = judge(_originals(editor, latents))
    keep = [i for i, j in enumerate(first) if j.valid]
    scores = WorldScores(originals=num, valid=len(keep) / num)
    if not keep:
        scores.accuracy = {s: dict.fromkeys(ATTRIBUTES, 0.0) for s in splits}
        scores.preserved = {s: dict.fromkeys(ATTRIBUTES, 0.0) for s in splits}
        return scores
    rng = random.Random(seed)
    for split in splits:
        scores.accuracy[split], scores.preserved[split] = {}, {}
        for attribute in ATTRIBUTES:
            targets, prompts = [], []
            for i in keep:
                current = getattr(first[i].scene, attribute)
                target = rng.choice([v for v in values(attribute) if v != current])
                targets.append(target)
                prompts.append(edit_prompt(attribute, target, rng, split))
            edited = judge(editor.edit(latents[keep], prompts))
            reached = kept = 0
            others = [a for a in ATTRIBUTES if a != attribute]
            for i, target, j in zip(keep, targets, edited):
                if j.valid:
                    reached += getattr(j.scene, attribute) == target
                    kept += all(getattr(j.scene, a) == getattr(first[i].scene, a) for a in others)
            scores.accuracy[split][attribute] = reached / len(keep)
            scores.preserved[split][attribute] = kept / len(keep)
            if on_progress is not None:
                on_progress(f"{split} {attribute}: {100 * reached / len(keep):.1f}% reached the value asked, "
                            f"{100 * kept / len(keep):.1f}% kept the other attributes")
    return scores


def report(editor: Editor, num: int = 128, seed: int = 0, truncation: float = 1.0,
           on_progress: Callable[[str], None] | None = None) -> str:
    """The table of valid originals, edit accuracy and preservation per attribute for seen and held-out phrasings
    (`evaluate`), after refusing an editor that does not draw the world's pictures; `on_progress` hears each step."""
    if editor.resolution != resolution():
        raise InputError(f"the generator draws {editor.resolution}-pixel pictures, not the shapes world's "
                         f"{resolution()}; use the world preset or weights trained by `make world`")
    if on_progress is not None:
        on_progress(f"judging {num} originals (seed {seed}, truncation {truncation}) and "
                    f"{len(SPLITS) * len(ATTRIBUTES)} edits of each")
    return evaluate(editor, num=num, seed=seed, truncation=truncation, on_progress=on_progress).table()


def edit_accuracy(editor: Editor, num: int = 128, seed: int = 0, split: str = "held-out") -> float:
    """Mean edit accuracy over the four attributes, in [0, 1], on `split` phrasings (the bench's column)."""
    return evaluate(editor, num=num, seed=seed, splits=(split,)).mean_accuracy(split)


def _originals(editor: Editor, latents: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(editor.synthesize(latents))

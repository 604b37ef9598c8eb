"""The words the world's text encoder saw in training, and the words of a prompt it never saw.

A word never seen in training carries no meaning for the world's small CLIP, so a prompt made of such words is a
different edit than it reads. Only text encoders trained on the world have this list: `is_world_text_encoder` and
`folder_has_world_text_encoder` say whether a loaded one is; for real CLIP weights there is nothing to say.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from ..config import PRESETS
from .captions import SEEN_CAPTIONS, SEEN_EDITS, SYNONYMS, THINGS, _articles, _slots


def words(text: str) -> list[str]:
    """The lowercase words of `text`, punctuation dropped, in order."""
    return re.findall(r"[^\W_]+", text.lower())


@functools.cache
def seen_vocabulary() -> frozenset[str]:
    """Every word of the seen captions and edit prompts, with every synonym and generic noun in their slots."""
    templates = [*SEEN_CAPTIONS, *(t for ts in SEEN_EDITS.values() for t in ts)]
    fillers = [*THINGS, *(w for values in SYNONYMS.values() for ws in values.values() for w in ws)]
    seen: set[str] = set()
    for template in templates:
        for filler in fillers:
            seen.update(words(_articles(template.format(**dict.fromkeys(_slots(template), filler)))))
    return frozenset(seen)


def unseen_words(prompt: str) -> list[str]:
    """The words of `prompt` that the world's text encoder never saw in training, in order, each once."""
    vocabulary = seen_vocabulary()
    return list(dict.fromkeys(w for w in words(prompt) if w not in vocabulary))


def is_world_text_encoder(preset: str, text_encoder_file: Path | None) -> bool:
    """Whether the text encoder loaded for `preset` is the world's trained one: no file of its own is given
    (`--clip`) and the preset's trained weights are the world's."""
    known = PRESETS.get(preset)
    return text_encoder_file is None and known is not None and known.weights == __package__


def folder_has_world_text_encoder(folder: Path) -> bool:
    """Whether the artifact folder's text encoder was exported from the world's trained one (its manifest names the
    preset's embedded default as the source)."""
    from ..artifacts import read_manifest

    manifest = read_manifest(folder, verify=False)
    source = manifest.get("sources", {}).get("text_encoder", {})
    own = None if "embedded_default" in source else Path(str(source.get("path", "")))
    return is_world_text_encoder(str(manifest.get("preset")), own)

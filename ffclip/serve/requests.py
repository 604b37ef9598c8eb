"""The JSON bodies the HTTP API accepts, checked into plain objects; every problem is an `InputError` of one line
that names what was wrong without echoing more than a few characters of it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..latents import check_latents

MAX_PROMPT_CHARS = 1000
MAX_PROMPTS = 64
MAX_INT_DIGITS = 20
MAX_STRENGTH = 100.0
MAX_LATENT = 1000.0
DEFAULT_TRUNCATION = 0.7
EDIT_FIELDS = {"prompt", "seed", "latents", "strength", "truncation"}
SHOWN_CHARS = 40  # of a client's value quoted in an error
SHOWN_FIELDS = 5  # unknown field names quoted in an error


@dataclass(frozen=True)
class EditRequest:
    """One edit: a prompt, and either a seed (sampled through the mapping network) or latents `[L, D]`."""

    prompt: str
    strength: float = 1.0
    seed: int | None = None
    latents: torch.Tensor | None = None
    truncation: float = DEFAULT_TRUNCATION


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body. Integers longer than `MAX_INT_DIGITS` digits and nesting too deep to
    decode are refused like any other bad body."""
    try:
        return json.loads(body, parse_int=_integer)
    except RecursionError:
        raise InputError("the body nests JSON too deeply to read; send a flat JSON object") from None
    except UnicodeDecodeError:
        raise InputError("the body is not UTF-8 text; send a JSON object") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"the body is not JSON ({exc.msg} at character {exc.pos}); send a JSON object") from None


def parse_edit(body: Any, num_ws: int, dim: int) -> EditRequest:
    """An `EditRequest` from a decoded `/v1/edit` body, for a generator with `num_ws` style layers of width `dim`."""
    body = _object(body, EDIT_FIELDS)
    prompt = parse_prompt(body.get("prompt"))
    if ("seed" in body) == ("latents" in body):
        raise InputError(f'give exactly one of "seed" (an integer) or "latents" ([{num_ws}, {dim}] or [{dim}] '
                         "numbers)")
    strength = _number(body.get("strength", 1.0), "strength")
    if abs(strength) > MAX_STRENGTH:
        raise InputError(f'"strength" must lie in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], got {strength:g}')
    truncation = _number(body.get("truncation", DEFAULT_TRUNCATION), "truncation")
    if not 0 <= truncation <= 1:
        raise InputError(f'"truncation" must lie in [0, 1], got {truncation:g}')
    if "seed" in body:
        seed = body["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise InputError(f'"seed" must be an integer in [0, 2^32), got {_shown(seed)}')
        return EditRequest(prompt, strength, seed=seed, truncation=truncation)
    return EditRequest(prompt, strength, latents=_latents(body["latents"], num_ws, dim), truncation=truncation)


def parse_prompts(body: Any) -> list[str]:
    """The prompts of a decoded `/v1/encode` body: `{"prompt": str}` or `{"prompts": [str, ...]}`."""
    body = _object(body, {"prompt", "prompts"})
    if ("prompt" in body) == ("prompts" in body):
        raise InputError('give exactly one of "prompt" (a string) or "prompts" (a list of strings)')
    if "prompt" in body:
        return [parse_prompt(body["prompt"])]
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPTS:
        raise InputError(f'"prompts" must be a list of 1 to {MAX_PROMPTS} strings')
    return [parse_prompt(p) for p in prompts]


def parse_prompt(prompt: Any) -> str:
    """A non-empty prompt of at most `MAX_PROMPT_CHARS` characters, stripped of surrounding white space."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError('"prompt" must be a non-empty string')
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f'"prompt" is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}')
    return prompt.strip()


def _integer(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise InputError(f"the body holds an integer of {digits} digits; the limit is {MAX_INT_DIGITS}")
    return int(text)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _object(body: Any, fields: set[str]) -> dict:
    if not isinstance(body, dict):
        raise InputError(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - fields)
    if unknown:
        named = ", ".join(_shown(name) for name in unknown[:SHOWN_FIELDS])
        more = f" and {len(unknown) - SHOWN_FIELDS} more" if len(unknown) > SHOWN_FIELDS else ""
        raise InputError(f"unknown field(s) {named}{more}; accepted: {', '.join(sorted(fields))}")
    return body


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f'"{name}" must be a finite number, got {_shown(value)}')
    return float(value)


def _latents(value: Any, num_ws: int, dim: int) -> torch.Tensor:
    try:
        w = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise InputError(f'"latents" must be a list of {dim} numbers or {num_ws} such lists') from None
    if tuple(w.shape) not in ((dim,), (num_ws, dim)):
        raise InputError(f'"latents" has shape {list(w.shape)}; expected [{num_ws}, {dim}] or [{dim}]')
    if bool((w.abs() > MAX_LATENT).any()):
        raise InputError(f'"latents" values must lie in [-{MAX_LATENT:g}, {MAX_LATENT:g}]')
    return check_latents(w[None], num_ws, dim, where='"latents"')[0]

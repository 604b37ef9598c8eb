"""Errors that are meant for users: one clear line saying what, where and what to do."""


def summarize(exc: BaseException) -> str:
    """`Type: first line of its message` (just the type when there is no message): an underlying exception in one line."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class FfclipError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLI."""


class CheckpointError(FfclipError):
    """A checkpoint file that is missing, unreadable, truncated or of a kind this project does not read."""


class InputError(FfclipError):
    """Latents, prompts, devices or options that cannot be used as given."""

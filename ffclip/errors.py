"""Errors that are meant for users: one clear line saying what, where and what to do."""


class FfclipError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLI."""


class CheckpointError(FfclipError):
    """A checkpoint file that is missing, unreadable, truncated or of a kind this project does not read."""


class InputError(FfclipError):
    """Latents, prompts, devices or options that cannot be used as given."""

"""The one exception type vitkit raises for a user's mistake, printed by the CLI as one line."""

from __future__ import annotations

from pathlib import Path


class VitkitError(Exception):
    """A problem with the user's input (a file, an argument) that a message can explain."""


class CheckpointError(VitkitError):
    """A weights file that cannot be read, is unsafe, or does not fit the model."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (200 characters at most), for one-line
    errors; its type's name when it has no message."""
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__

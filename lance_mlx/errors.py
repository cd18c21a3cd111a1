"""The errors lance-mlx raises on purpose: one base class, each also a ValueError / TypeError / OSError as fits.

The command-line scripts turn every `LanceError` into one line on stderr: exit 2 for what the user can fix (a bad
argument, input file or model folder), exit 1 for a failure while running (`GenerationError`, a write that
failed: `WriteError`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LanceError(Exception):
    """Base class of every error raised on purpose by lance-mlx. `param` names the request field at fault, when
    one is (the command-line scripts show it as their flag, a server as the error's `param`)."""

    exit_code = 2

    def __init__(self, message: str = "", param: str = None):
        super().__init__(message)
        self.param = param


class InvalidRequestError(LanceError, ValueError):
    """A request's value is wrong (size, frame count, guidance, seed, prompt, input media, output path)."""


class InputNotFoundError(InvalidRequestError, FileNotFoundError):
    """An input file (image, video) does not exist."""


class InvalidTypeError(LanceError, TypeError):
    """A request's value has the wrong type (e.g. a number where text is expected)."""


class WeightsError(LanceError, ValueError):
    """A model folder or weight file is missing, incomplete, of an unknown layout, or wrong for the task."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A weight file named directly (not found through a model folder) does not exist."""


class OutputError(LanceError, OSError):
    """An output path is refused or unusable (an existing folder, a file the tool did not write, no such folder)."""


class WriteError(OutputError):
    """Writing an output failed while running (full disk, failed encoder); nothing is left under the final name."""

    exit_code = 1


class GenerationError(LanceError, RuntimeError):
    """A run failed after it started for a reason other than its inputs."""

    exit_code = 1


class OutputTakenError(WriteError):
    """The output's name was taken while running by something the run may not replace: that is left alone, and
    the result was saved under `saved`, a free name beside it."""

    def __init__(self, message: str = "", param: str = None, saved=None):
        super().__init__(message, param)
        self.saved = saved


class InsufficientMemoryError(InvalidRequestError):
    """A request's estimated peak memory exceeds what the machine has available (lance_mlx/memory_estimate.py)."""

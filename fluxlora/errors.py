"""Every user-facing error type, in one torch-free module.

A user-facing error carries a message that names the value and the fix; the CLI prints it on one line and
exits with code 2 (``USER_ERRORS``). Anything else is a bug and keeps its traceback. The web UI catches these
without importing the trainer."""

from __future__ import annotations

from fluxlora.config_errors import ConfigError


class RunError(Exception):
    """A problem with a run folder or a command's arguments (locked folder, no checkpoint, bad flag)."""


class ModelLoadError(Exception):
    """The base model cannot be found or loaded (path missing, hub unreachable in offline mode, ...)."""


class DataError(Exception):
    """A data problem; the message names the folder or file and the fix."""


class AdapterError(ValueError):
    """A problem with the adapter settings (targets, rank, init file, ...)."""


class InitError(ValueError):
    """An init method cannot produce factors for this layer / rank (the message names the fix)."""


class CheckpointError(Exception):
    """A checkpoint cannot be written or read."""


class TrainingStopped(Exception):
    """The run stopped for a reason the user must act on (non-finite loss, write failure)."""


USER_ERRORS = (ConfigError, DataError, ModelLoadError, AdapterError, CheckpointError, RunError)


def write_errors() -> tuple[type[BaseException], ...]:
    """What writing a file may raise when the disk is full or the folder unwritable, by writer: OSError
    (open/write/rename, PIL, json), RuntimeError (torch.save's zip writer), SafetensorError (safetensors)."""
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)

"""The project's one error policy.

`UserError` is a problem with what the user gave or the machine they gave it on: a config
value, a file, a dataset, a checkpoint, an HF directory, a directory another run holds, a
loss that went non-finite. Its message names the thing and says how to fix it; `xft` prints
it and exits with `exit_code` (2; 3 for a non-finite loss). Every other exception is a bug
and keeps its traceback. Each concrete class also derives from the builtin it refines
(ValueError, OSError, ...), so callers that catch those keep working.
"""


class UserError(Exception):
    """Something the user can fix; the message says what and how."""

    exit_code = 2


class UsageError(UserError, ValueError):
    """A bad argument or value of a command or function, in the user's terms."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


class HFFormatError(UserError, ValueError):
    """An HF directory this project cannot read exactly; the message names file and problem."""


class MissingPackage(UserError, ImportError):
    """An optional package a command needs is not installed; the message names it and how to
    install it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C (partial outputs removed on the way out) and is reported
    as such by `xft` (exit 143). `xft train` and the training stages of a pipeline instead
    checkpoint and stop after the current step, then raise this."""

"""Errors a user can act on: each is said in one line, naming the key or file and what is allowed."""


class PipelineError(Exception):
    """Base of the errors that stage commands report as one line (exit status 2), without a traceback."""


class ConfigError(PipelineError, ValueError):
    """A configuration value, key or file is not valid."""


class DataError(PipelineError):
    """The data cannot be fetched, verified or read."""


class Terminated(BaseException):
    """The process got SIGTERM (a scheduler's time limit, `timeout`, a stopping machine): unwind like Ctrl-C,
    so that open runs end KILLED. A BaseException, so that no `except Exception` swallows it."""

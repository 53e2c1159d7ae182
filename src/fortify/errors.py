"""The error hierarchy: every problem fortify reports is a FortifyError.

Messages name the offending value and what is allowed, so the CLI can print them
without a traceback and the user knows what to change.
"""

from __future__ import annotations


class FortifyError(Exception):
    """Base class of every error fortify raises on purpose."""


class ConfigError(FortifyError, ValueError):
    """A setting is out of range, unknown or inconsistent."""


class UnknownNameError(ConfigError, KeyError):
    """A registry was asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(FortifyError, ValueError):
    """Inputs or labels break the declared contract (box, shape, finiteness, range)."""


class ThreatModelViolation(FortifyError):
    """An attack returned a point outside the threat model."""


class CheckpointError(FortifyError):
    """A checkpoint is missing, foreign, of another version or tampered with."""


class MissingDependencyError(FortifyError, ImportError):
    """An optional dependency is not installed."""


class ResultsError(FortifyError):
    """A run directory or results file is missing, unreadable or of an unknown version."""


def shortened(text: str, most: int = 80) -> str:
    """``text`` cut to ``most`` characters with its length said: a 400-digit value, pasted by
    mistake, would otherwise fill the terminal with one error line."""
    if len(text) <= most:
        return text
    return f"{text[:most]}... ({len(text)} characters)"

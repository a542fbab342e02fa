"""Errors a user can fix (bad input, a missing artefact): the CLI prints them in one line,
without a traceback. Layer 0: imports nothing from the project."""

from __future__ import annotations


class CltRayError(Exception):
    """An error the user can fix (bad input, missing artefact); the CLI prints it without a traceback."""


class ConfigError(CltRayError, ValueError):
    """A config that cannot be used; the message names the file, the key and the problem."""

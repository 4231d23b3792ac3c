"""Configuration errors that name the offending field."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing or wrong.

    `field` is the dotted path or `[section] key` a user can search their file for.
    """

    def __init__(self, field: str, message: str, *, source: str = "") -> None:
        self.field = field
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")

"""Argument checks with one error format, `<field>: expected <what>, got <value>`, for both packages."""

from __future__ import annotations

__all__ = ["check"]


def check(field: str, ok: bool, expected: str, value: object) -> None:
    """Raise `ValueError` naming `field`, what it should be and what it was, unless `ok`."""
    if not ok:
        raise ValueError(f"{field}: expected {expected}, got {value!r}")

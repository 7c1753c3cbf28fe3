"""What a config section is made of: :func:`knob` fields and :class:`ConfigError`.

A leaf module (it imports nothing of uda-ray but :mod:`uda_ray.errors`), so the methods can declare their config
sections here without importing :mod:`uda_ray.config`, which builds configs from them.
"""

from __future__ import annotations

from dataclasses import field

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config key that does not exist, or a value of the wrong type or out of range."""


def knob(default, help: str, *, lo=None, hi=None, choices=None, lo_open=False):
    """A config field: default, one-line help, and its allowed range (``lo <= v <= hi``,
    ``lo < v`` with ``lo_open``) or choices."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "choices": choices,
                                            "lo_open": lo_open})

"""Which Triton mode is active: kernels compiled for the GPU, or Triton's CPU interpreter.

One small place below everything else (``ops`` and ``autotune`` both ask here), importing nothing heavy.
``TRITON_INTERPRET`` is read as Triton itself reads it (``getenv_bool`` in its C++ runtime): the
interpreter is on for ``1``, ``true``, ``on``, ``yes`` or ``y`` in any case, and off for anything else
(``0``, ``false``, ``no``, ``off``, empty or unset). ``tests/test_mode.py`` checks this against Triton.
"""

from __future__ import annotations

import os

_TRUTHY = frozenset({"1", "true", "on", "yes", "y"})


def env_flag(name: str) -> bool:
    """An environment flag read the way Triton reads its own (``TRITON_INTERPRET``)."""
    return os.environ.get(name, "").lower() in _TRUTHY


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET`` set to a true value)."""
    return env_flag("TRITON_INTERPRET")

"""fsq_triton: Finite Scalar Quantization on fused Triton kernels, a drop-in for the reference ``FSQ``.

    from fsq_triton import FSQ
    fsq = FSQ(levels=[8, 5, 5, 5, 5])
    quantized, indices = fsq(torch.randn(2, 5, 16, 16))   # (2, 5, 16, 16), (2, 16, 16)

``import fsq_triton`` stays cheap (a few hundredths of a second over ``import torch``): the Triton ops
(``fsq_triton.ops``, which import triton and torch's compile machinery) load on first use, when a module
is built or moved where they can run, or when ``torch.ops.fsq_triton.<op>`` is first looked up.
"""

import torch as _torch

from .levels import LevelTables, level_tables, validate_levels
from .module import BACKENDS, BackendUnavailableError, FSQ

__all__ = ["FSQ", "BACKENDS", "BackendUnavailableError", "LevelTables", "level_tables", "validate_levels",
           "ResidualFSQ", "GroupedResidualFSQ"]
__version__ = "0.1.0"

_LAZY = {"ResidualFSQ": ".residual", "GroupedResidualFSQ": ".residual"}


def __getattr__(name: str):
    """``ResidualFSQ`` and ``GroupedResidualFSQ`` import their module (and its ops) on first access."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _LazyOpNamespace(_torch._ops._OpNamespace):
    """``torch.ops.fsq_triton``: looking up an op not defined yet imports ``fsq_triton.ops``, which defines them
    all, so the ops are there for every user (``torch.ops.fsq_triton.quantize``, ``torch.export.load``)."""

    __module__ = _torch._ops._OpNamespace.__module__  # the ops' qualified names (export serialises them) stay torch's

    def __getattr__(self, op_name: str):
        if not op_name.startswith("__"):
            try:
                from . import ops  # noqa: F401  (defines torch.ops.fsq_triton.*)
            except ImportError as error:
                raise AttributeError(f"torch.ops.fsq_triton.{op_name} needs triton, which cannot be imported: {error}") from error
        return super().__getattr__(op_name)


if type(_torch.ops.fsq_triton) is _torch._ops._OpNamespace:
    _torch.ops.fsq_triton.__class__ = _LazyOpNamespace

"""fsq_triton: Finite Scalar Quantization on fused Triton kernels, a drop-in for the reference ``FSQ``.

    from fsq_triton import FSQ
    fsq = FSQ(levels=[8, 5, 5, 5, 5])
    quantized, indices = fsq(torch.randn(2, 5, 16, 16))   # (2, 5, 16, 16), (2, 16, 16)
"""

from .levels import LevelTables, level_tables, validate_levels
from .module import BACKENDS, BackendUnavailableError, FSQ

__all__ = ["FSQ", "BACKENDS", "BackendUnavailableError", "LevelTables", "level_tables", "validate_levels"]
__version__ = "0.1.0"

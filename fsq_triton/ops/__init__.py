"""Fused FSQ ops: Triton kernels, their launchers, ``torch.library`` custom ops and the autograd.Functions.

- ``fsq``: the quantizer alone (forward, backward, decode) on the feature view ``(b, c*d, n)``;
- ``fsq_projected``: ``project_in`` -> quantizer -> ``project_out`` fused, and decode with ``project_out``;
- ``residual``: all stages of ``ResidualFSQ``/``GroupedResidualFSQ`` in one kernel, forward and backward;
- ``autograd``: every op's registered gradient (of every order) and the autograd.Functions the module calls.

Importing this package imports triton and torch's compile machinery (about a second and a half), so
``fsq_triton`` imports it on first use only (see ``fsq_triton/__init__.py``).
"""

from .._mode import interpreting
from .autograd import (
    FSQFunction,
    FSQProjectedFunction,
    IndicesToCodesProjectedFunction,
    NoisyQuantizeFunction,
    QuantizeBackwardFunction,
    RotatedDecodeProjectedFunction,
    RotatedProjectedFunction,
    RotatedQuantizeFunction,
    apply_indices_to_codes,
    apply_indices_to_codes_projected,
    apply_quantize,
    apply_quantize_noisy,
    apply_quantize_projected,
    apply_quantize_projected_rotated,
    apply_quantize_rotated,
    decode_projected_rotated,
    decode_rotated,
    noise_in_kernel,
)
from .fsq import indices_to_codes, quantize, quantize_backward
from .fsq_projected import indices_to_codes_projected, quantize_projected
from . import residual as _residual  # noqa: F401  registers fsq_triton::residual_* (torch.export.load needs them)

__all__ = [
    "FSQFunction", "FSQProjectedFunction", "IndicesToCodesProjectedFunction", "NoisyQuantizeFunction",
    "QuantizeBackwardFunction", "RotatedDecodeProjectedFunction", "RotatedProjectedFunction", "RotatedQuantizeFunction",
    "apply_quantize", "apply_quantize_noisy", "apply_quantize_projected", "apply_quantize_projected_rotated",
    "apply_quantize_rotated", "decode_projected_rotated", "decode_rotated", "noise_in_kernel",
    "apply_indices_to_codes", "apply_indices_to_codes_projected",
    "quantize", "quantize_backward", "indices_to_codes", "quantize_projected", "indices_to_codes_projected",
    "interpreting",
]

"""Fused FSQ ops: Triton kernels, their launchers, ``torch.library`` custom ops and the autograd.Functions.

- ``fsq``: the quantizer alone (forward, backward, decode) on the feature view ``(b, c*d, n)``;
- ``fsq_projected``: ``project_in`` -> quantizer -> ``project_out`` fused, and decode with ``project_out``.
"""

from .fsq import FSQFunction, indices_to_codes, interpreting, quantize, quantize_backward
from .fsq_projected import FSQProjectedFunction, indices_to_codes_projected, quantize_projected

__all__ = [
    "FSQFunction", "FSQProjectedFunction", "quantize", "quantize_backward", "indices_to_codes",
    "quantize_projected", "indices_to_codes_projected", "interpreting",
]

"""Fused FSQ ops: Triton kernels, their launchers, ``torch.library`` custom ops and the autograd.Function."""

from .fsq import FSQFunction, indices_to_codes, interpreting, quantize, quantize_backward

__all__ = ["FSQFunction", "quantize", "quantize_backward", "indices_to_codes", "interpreting"]

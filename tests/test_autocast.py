"""Autocast: the quantizer stays float32 and the projections follow the weights, on both backends."""

import pytest
import torch

from fsq_triton import FSQ


@pytest.mark.parametrize("dim", [None, 24])
def test_autocast_does_not_change_the_result(dim, backend):
    torch.manual_seed(0)
    m = FSQ([8, 5, 5, 5], dim=dim, num_codebooks=2, backend=backend)
    z = torch.randn(2, m.dim, 3, 5)
    out, indices = m(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a_out, a_indices = m(z)
        a_codes = m.indices_to_codes(indices)
    assert a_out.dtype == z.dtype
    assert torch.equal(a_indices, indices)
    torch.testing.assert_close(a_out, out, atol=1e-6, rtol=0)
    torch.testing.assert_close(a_codes, m.indices_to_codes(indices), atol=1e-6, rtol=0)


def test_gradients_of_every_parameter_in_bfloat16(backend):
    torch.manual_seed(1)
    m32 = FSQ([8, 5, 5, 5], dim=32, backend=backend)
    m16 = FSQ([8, 5, 5, 5], dim=32, backend=backend)
    m16.load_state_dict(m32.state_dict())
    m16 = m16.to(torch.bfloat16)
    z = torch.randn(2, 50, 32)
    g = torch.randn(2, 50, 32)
    out32, idx32 = m32(z)
    out32.backward(g)
    out16, idx16 = m16(z.bfloat16())
    out16.backward(g.bfloat16())
    assert out16.dtype == torch.bfloat16
    assert (idx16 == idx32).float().mean() > 0.9  # tokens near a threshold may flip in half precision
    for (name, p32), (_, p16) in zip(m32.named_parameters(), m16.named_parameters()):
        assert p16.grad is not None and p16.grad.dtype == torch.bfloat16, name
        scale = p32.grad.abs().max()
        assert (p16.grad.float() - p32.grad).abs().max() <= 0.1 * scale + 1e-2, name

"""noise_dropout drawn in the forward kernel (issue 11): no noise tensor, vqp's properties, a gradient that follows
the clamp, and the torch-op noise wherever the kernel path does not apply.

vqp's noise dropout (training, ``preserve_symmetry``): with probability ``p`` an element's code gets ``U(-1/2, 1/2)``
added and is clamped to ``[-1, 1]``; the indices come from the codes before the noise. On the Triton path a plain
eager call draws it in the kernel (Philox from a seed of torch's CPU generator); the properties are checked in
tests/test_vqp_options.py on both backends, these tests pin the kernel path itself.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fsq_triton import FSQ
from fsq_triton import ops as fsq_ops


def noisy_module(device, p=1.0, levels=(7, 5, 4)):
    return FSQ(list(levels), preserve_symmetry=True, noise_dropout=p, backend="triton").to(device).train()


def test_plain_eager_training_draws_the_noise_in_the_kernel(monkeypatch, device):
    """No torch-op noise (no noise tensor) on the kernel path, and vqp's properties hold."""
    def no_torch_noise(self, codes):
        raise AssertionError("the torch-op noise ran")

    monkeypatch.setattr(FSQ, "_apply_noise", no_torch_noise)
    fsq = noisy_module(device, 0.5)
    z = (torch.randn(3, 64, 3, generator=torch.Generator().manual_seed(0)) * 2).to(device)
    clean, clean_indices = fsq.eval()(z)
    fsq.train()
    torch.manual_seed(5)
    noisy, indices = fsq(z)
    torch.manual_seed(5)
    again, _ = fsq(z)
    assert torch.equal(noisy, again) and torch.equal(indices, clean_indices)
    diff = noisy - clean
    assert 0 < (diff != 0).float().mean() <= 0.5 + 0.05 and diff.abs().max() <= 0.5 and noisy.abs().max() <= 1.0
    torch.manual_seed(6)
    assert not torch.equal(fsq(z)[0], noisy), "another seed must draw other noise"


def test_gradient_follows_the_clamp(device):
    """Where the clamp cut a noisy code the gradient is 0, elsewhere the straight-through gradient of the clean
    code; codes within 1/2 of 0 can never be clamped (|offset| < 1/2)."""
    fsq = noisy_module(device, 1.0)
    z = (torch.randn(2, 300, 3, generator=torch.Generator().manual_seed(1)) * 1.5).to(device)
    g = torch.randn(2, 300, 3, generator=torch.Generator().manual_seed(2)).to(device)
    zc = z.clone().requires_grad_(True)
    clean, _ = fsq.eval()(zc)
    clean.backward(g)
    zn = z.clone().requires_grad_(True)
    torch.manual_seed(3)
    noisy, _ = fsq.train()(zn)
    noisy.backward(g)
    differs = zn.grad != zc.grad
    assert differs.any(), "with p = 1 some noisy codes must be clamped"
    assert torch.all(zn.grad[differs] == 0) and torch.all(noisy.detach()[differs].abs() == 1.0)
    interior = noisy.detach().abs() < 1.0
    assert torch.equal(zn.grad[interior], zc.grad[interior])
    near_zero = clean.detach().abs() < 0.5
    assert torch.equal(zn.grad[near_zero], zc.grad[near_zero])


def test_backward_redraws_the_forwards_noise(device):
    """The backward redraws from the saved seed: two backward passes of one forward agree, whatever the global
    generator did in between."""
    fsq = noisy_module(device, 1.0)
    z = (torch.randn(1, 128, 3, generator=torch.Generator().manual_seed(4)) * 2).to(device).requires_grad_(True)
    torch.manual_seed(8)
    out, _ = fsq(z)
    g = torch.ones_like(out)
    first, = torch.autograd.grad(out, z, g, retain_graph=True)
    torch.rand(1000)  # move the global generator
    second, = torch.autograd.grad(out, z, g)
    assert torch.equal(first, second)


def test_gradient_of_the_gradient_says_it_is_unsupported(device):
    fsq = noisy_module(device, 0.5)
    z = torch.randn(1, 16, 3, device=device).requires_grad_(True)
    out, _ = fsq(z)
    with pytest.raises(NotImplementedError, match="create_graph=True.*noise_dropout.*backend='torch'"):
        torch.autograd.grad(out.sum(), z, create_graph=True)


def test_traced_and_transformed_calls_take_the_torch_op_noise(monkeypatch, device):
    """Under a dispatch mode (a tracer would be the same) or torch.func the kernel path does not apply: the noise
    runs in torch ops there, with the same properties."""
    calls = []
    original = FSQ._apply_noise

    def counted(self, codes):
        calls.append(codes.shape)
        return original(self, codes)

    monkeypatch.setattr(FSQ, "_apply_noise", counted)
    fsq = noisy_module(device, 0.25)
    z = torch.randn(2, 8, 3, device=device)
    assert fsq_ops.noise_in_kernel(z.transpose(1, 2))
    with FlopCounterMode(display=False):
        out, _ = fsq(z)
    assert len(calls) == 1 and out.abs().max() <= 1.0
    torch.func.vmap(lambda x: fsq(x)[0], randomness="different")(z[:, None])  # torch.func asks which randomness
    assert len(calls) == 2

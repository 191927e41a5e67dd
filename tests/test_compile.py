"""torch.compile, torch.export and torch.library.opcheck on the CPU (the CUDA ones are in test_gpu.py).

Under the test suite's interpreter switch the module runs its Triton path on CPU tensors eagerly; while
compiling, the ops' device branch traces the PyTorch path. Either way the compiled model must give the
eager model's indices, outputs and gradients.
"""

import pytest
import torch
from torch import nn

import fsq_triton  # noqa: F401  (registers torch.ops.fsq_triton)
from fsq_triton import FSQ, level_tables

CONFIGS = [
    pytest.param(dict(levels=[8, 5, 5, 5, 5]), (2, 5, 6, 8), id="image"),
    pytest.param(dict(levels=[8, 8, 8, 5, 5, 5]), (1, 6, 2, 4, 4), id="video"),
    pytest.param(dict(levels=[8, 5, 5, 5], num_codebooks=2), (2, 12, 8), id="sequence-2-codebooks"),
    pytest.param(dict(levels=[8, 6, 5], dim=16), (2, 16, 3, 5), id="image-projections"),
]


class Tokenizer(nn.Module):
    """A small model around FSQ, as a tokenizer would hold it."""

    def __init__(self, fsq_kwargs):
        super().__init__()
        self.fsq = FSQ(**fsq_kwargs)

    def forward(self, z):
        out, indices = self.fsq(z)
        return out * 2.0, indices


def _grad(model, z, g):
    z = z.detach().clone().requires_grad_()
    out, indices = model(z)
    out.backward(g)
    return out.detach(), indices, z.grad


@pytest.mark.parametrize("fsq_kwargs,shape", CONFIGS)
def test_compile_fullgraph_matches_eager(fsq_kwargs, shape):
    torch.manual_seed(0)
    model = Tokenizer(fsq_kwargs)
    z = torch.randn(shape) * 2
    g = torch.randn(shape)
    out, indices, grad = _grad(model, z, g)
    compiled = torch.compile(model, fullgraph=True)
    c_out, c_indices, c_grad = _grad(compiled, z, g)
    assert torch.equal(c_indices, indices)
    torch.testing.assert_close(c_out, out, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_grad, grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fsq_kwargs,shape", CONFIGS)
def test_export_matches_eager(fsq_kwargs, shape):
    torch.manual_seed(1)
    model = Tokenizer(fsq_kwargs)
    z = torch.randn(shape) * 2
    out, indices = model(z)
    program = torch.export.export(model, (z,))
    e_out, e_indices = program.module()(z)
    assert torch.equal(e_indices, indices)
    torch.testing.assert_close(e_out, out, atol=1e-6, rtol=0)
    z2 = torch.randn(shape)  # the program is a function, not a recording of one input
    assert torch.equal(program.module()(z2)[1], model(z2)[1])


def _feature(shape, channels_last):
    b, e, n = shape
    t = torch.randn(b, n, e) if channels_last else torch.randn(b, e, n)
    return t.transpose(1, 2) if channels_last else t


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_every_op(channels_last):
    torch.manual_seed(2)
    levels, c = (8, 5, 5, 5), 2
    tables = level_tables(levels, "cpu")
    z = _feature((2, c * len(levels), 10), channels_last).requires_grad_()
    ops = torch.ops.fsq_triton
    torch.library.opcheck(ops.quantize.default, (z, tables.values, tables.integers, c, channels_last))
    torch.library.opcheck(ops.quantize_backward.default, (torch.randn(z.shape), z.detach(), tables.values, channels_last))
    indices = torch.randint(0, 1000, (2, 10, c), dtype=torch.int32)
    torch.library.opcheck(
        ops.indices_to_codes.default, (indices, tables.values, tables.integers, 1000, channels_last, torch.float32)
    )
    dim = 16
    w_in, b_in = torch.randn(c * len(levels), dim), torch.randn(c * len(levels))
    w_out, b_out = torch.randn(dim, c * len(levels)), torch.randn(dim)
    x = _feature((2, dim, 10), channels_last)
    torch.library.opcheck(
        ops.quantize_projected.default,
        (x, w_in, b_in, w_out, b_out, tables.values, tables.integers, c, channels_last, True),
    )
    torch.library.opcheck(
        ops.indices_to_codes_projected.default,
        (indices, w_out, b_out, tables.values, tables.integers, 1000, channels_last),
    )


def test_compile_before_any_eager_call():
    """The first forward may be a traced one: the module calibrated its tables when it was built and moved."""
    model = FSQ([9, 7, 4]).to(torch.float64).to("cpu")  # levels no other test uses
    compiled = torch.compile(model, fullgraph=True)
    z = torch.randn(2, 3, 4, 5)
    out, indices = compiled(z)
    e_out, e_indices = model(z)
    assert torch.equal(indices, e_indices)
    assert torch.equal(out, e_out)

"""torch.compile, torch.export and CUDA graphs on a GPU (marked ``gpu``; skipped without CUDA).

Run on a CUDA machine with ``TRITON_INTERPRET=0 python -m pytest -m gpu``.
"""

import pytest
import torch
from torch import nn

import fsq_triton.ops.fsq as fsq_ops
from fsq_triton import FSQ, level_tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or fsq_ops.interpreting(),
        reason="needs a CUDA GPU and compiled kernels (TRITON_INTERPRET=0)",
    ),
]

CONFIGS = [
    pytest.param(dict(levels=[8, 8, 8, 5, 5, 5]), (2, 6, 4, 32, 32), torch.float32, id="video-f32"),
    pytest.param(dict(levels=[8, 8, 8, 5, 5, 5]), (2, 6, 4, 32, 32), torch.bfloat16, id="video-bf16"),
    pytest.param(dict(levels=[8, 5, 5, 5], num_codebooks=2), (4, 256, 8), torch.float32, id="sequence-2-codebooks"),
    pytest.param(dict(levels=[8, 5, 5, 5], dim=256), (4, 128, 256), torch.bfloat16, id="sequence-projections-bf16"),
    pytest.param(dict(levels=[8, 6, 5], dim=64), (2, 64, 8, 8), torch.float32, id="image-projections"),
]


class Tokenizer(nn.Module):
    def __init__(self, fsq_kwargs):
        super().__init__()
        self.fsq = FSQ(**fsq_kwargs)

    def forward(self, z):
        out, indices = self.fsq(z)
        return out * 2.0, indices


def _build(fsq_kwargs, dtype):
    model = Tokenizer(fsq_kwargs).cuda()
    if fsq_kwargs.get("dim"):
        model = model.to(dtype)
    return model


def _run(model, z, g):
    z = z.detach().clone().requires_grad_()
    out, indices = model(z)
    out.backward(g)
    return out.detach(), indices, z.grad


@pytest.mark.parametrize("fsq_kwargs,shape,dtype", CONFIGS)
def test_compile_fullgraph_matches_eager_on_cuda(fsq_kwargs, shape, dtype):
    torch.manual_seed(0)
    model = _build(fsq_kwargs, dtype)
    z = torch.randn(shape, device="cuda", dtype=dtype) * 2
    g = torch.randn(shape, device="cuda", dtype=dtype)
    out, indices, grad = _run(model, z, g)
    c_out, c_indices, c_grad = _run(torch.compile(model, fullgraph=True), z, g)
    assert torch.equal(c_indices, indices)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(c_out, out, atol=tol, rtol=0)
    torch.testing.assert_close(c_grad, grad, atol=max(tol, 1e-5), rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("fsq_kwargs,shape,dtype", CONFIGS)
def test_export_matches_eager_on_cuda(fsq_kwargs, shape, dtype):
    torch.manual_seed(1)
    model = _build(fsq_kwargs, dtype)
    z = torch.randn(shape, device="cuda", dtype=dtype) * 2
    out, indices = model(z)
    program = torch.export.export(model, (z,))
    e_out, e_indices = program.module()(z)
    assert torch.equal(e_indices, indices)
    torch.testing.assert_close(e_out, out, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)


@pytest.mark.parametrize("fsq_kwargs,shape,dtype", CONFIGS[:3])
def test_cuda_graph_capture_forward_and_backward(fsq_kwargs, shape, dtype):
    """No host sync and no data-dependent host logic: the step is capturable and replays correctly."""
    torch.manual_seed(2)
    model = _build(fsq_kwargs, dtype)
    static_z = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    static_g = torch.randn(shape, device="cuda", dtype=dtype)

    def step():
        static_z.grad = None
        out, indices = model(static_z)
        out.backward(static_g)
        return out.detach(), indices, static_z.grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: calibration, compilation, autograd buffers
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_indices, g_grad = step()

    new_z = torch.randn(shape, device="cuda", dtype=dtype) * 3
    with torch.no_grad():
        static_z.copy_(new_z)
    graph.replay()
    torch.cuda.synchronize()
    e_out, e_indices, e_grad = _run(model, new_z, static_g)
    assert torch.equal(g_indices, e_indices)
    assert torch.equal(g_out, e_out)
    torch.testing.assert_close(g_grad, e_grad, atol=1e-6, rtol=0)


def test_compile_reduce_overhead_mode():
    torch.manual_seed(3)
    model = _build(dict(levels=[8, 5, 5, 5, 5]), torch.float32)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        z = torch.randn(64, 5, 32, 32, device="cuda")
        out, indices = compiled(z)
        e_out, e_indices = model(z)
        assert torch.equal(indices, e_indices)
        assert torch.equal(out, e_out)


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_every_op_on_cuda(channels_last):
    torch.manual_seed(4)
    levels, c, dim = (8, 5, 5, 5), 2, 64
    tables = level_tables(levels, "cuda")
    e = c * len(levels)

    def feature(rows, n):
        t = torch.randn(2, n, rows, device="cuda") if channels_last else torch.randn(2, rows, n, device="cuda")
        return t.transpose(1, 2) if channels_last else t

    ops = torch.ops.fsq_triton
    z = feature(e, 64).requires_grad_()
    torch.library.opcheck(ops.quantize.default, (z, tables.values, tables.integers, c, channels_last))
    torch.library.opcheck(ops.quantize_backward.default, (torch.randn_like(z), z.detach(), tables.values, channels_last))
    indices = torch.randint(0, 1000, (2, 64, c), dtype=torch.int32, device="cuda")
    torch.library.opcheck(
        ops.indices_to_codes.default, (indices, tables.values, tables.integers, 1000, channels_last, torch.float32)
    )
    w_in, b_in = torch.randn(e, dim, device="cuda"), torch.randn(e, device="cuda")
    w_out, b_out = torch.randn(dim, e, device="cuda"), torch.randn(dim, device="cuda")
    torch.library.opcheck(
        ops.quantize_projected.default,
        (feature(dim, 64), w_in, b_in, w_out, b_out, tables.values, tables.integers, c, channels_last, True),
    )
    torch.library.opcheck(
        ops.indices_to_codes_projected.default, (indices, w_out, b_out, tables.values, tables.integers, 1000, channels_last)
    )

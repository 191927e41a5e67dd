"""ResidualFSQ and GroupedResidualFSQ with ``project_out`` fused into the residual kernel.

With projections (``dim != len(levels)``) the Triton path runs the stages and every group's ``project_out`` in one
launch (``fsq_triton::residual_quantize_projected``); ``project_in`` stays ``nn.Linear`` (its rounding decides the deep
stages' indices). These tests check the fused path against vqp 1.32 (where installed), against fsq_triton's own
PyTorch path, and against the kernel's torch twin, and that it stands aside wherever ``project_out`` must be called.
Shapes stay tiny (interpreter).
"""

import pytest
import torch
from torch import nn

from conftest import interpreting

from fsq_triton import GroupedResidualFSQ, ResidualFSQ
from fsq_triton.residual_levels import residual_tables

try:
    import vector_quantize_pytorch as vqp
except ImportError:
    vqp = None
needs_vqp = pytest.mark.skipif(vqp is None, reason="needs vector-quantize-pytorch (the live oracle; CI installs 1.32)")
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="runs the kernels on CPU tensors under the interpreter")

if interpreting():
    from fsq_triton.ops import residual as ops
else:
    ops = None

CASES = {
    "residual": (ResidualFSQ, dict(levels=[8, 5, 5, 5], num_quantizers=4, dim=32), (2, 13, 32)),
    "residual channel-first": (ResidualFSQ, dict(levels=[8, 5, 5, 5], num_quantizers=3, dim=16, is_channel_first=True),
                               (2, 16, 3, 5)),
    "residual no bias": (ResidualFSQ, dict(levels=[7, 5, 3], num_quantizers=5, dim=16, projection_has_bias=False),
                         (2, 11, 16)),
    "grouped": (GroupedResidualFSQ, dict(dim=32, groups=2, levels=[5, 5, 5, 5], num_quantizers=2), (2, 9, 32)),
    "grouped image": (GroupedResidualFSQ, dict(dim=48, groups=3, levels=[5, 5, 5], num_quantizers=3,
                                                accept_image_fmap=True, is_channel_first=True), (2, 48, 3, 4)),
}


def _pair(name, reference_cls=None, backend="triton"):
    cls, kwargs, shape = CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    ours = cls(**kwargs, backend=backend)
    other = (reference_cls or cls)(**kwargs) if reference_cls is not None else cls(**kwargs, backend="torch")
    other.load_state_dict(ours.state_dict(), strict=True)
    return ours, other, torch.randn(shape) * 2


def _vqp_class(name):
    return vqp.GroupedResidualFSQ if CASES[name][0] is GroupedResidualFSQ else vqp.ResidualFSQ


def _run(module, x, autocast, grad):
    leaf = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        quantized, indices = module(leaf)
    quantized.backward(grad.to(quantized.dtype))
    return quantized.detach(), indices, leaf.grad, {n: p.grad for n, p in module.named_parameters()}


def _compare(ours, reference, x, autocast):
    """Indices equal; output, input gradient and every parameter's gradient within float32 rounding (float32), or
    within one bfloat16 rounding (autocast: the output and the bf16 products are rounded to bfloat16)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        shape = reference(x)[0].shape
    grad = torch.randn(shape)
    qo, io, go, po = _run(ours, x, autocast, grad)
    qr, ir, gr, pr = _run(reference, x, autocast, grad)
    assert io.dtype == ir.dtype and torch.equal(io, ir)
    assert qo.dtype == qr.dtype and qo.shape == qr.shape
    tol = dict(rtol=1e-2, atol=1e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qo, qr, **tol)
    torch.testing.assert_close(go, gr, **(dict(rtol=1e-2, atol=1e-2) if autocast else dict(rtol=1e-5, atol=1e-5)))
    assert po.keys() == pr.keys()
    for name in po:
        torch.testing.assert_close(po[name], pr[name], rtol=1e-2 if autocast else 1e-5, atol=1e-2 if autocast else 1e-5,
                                   msg=lambda m: f"grad of {name}: {m}")
    return qo, qr


class _Spy:
    """Counts the fused launches with ``project_out`` (the autograd.Function's calls)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = ops.ResidualProjectedFunction.apply

        def apply(*args):
            self.calls += 1
            return original(*args)

        monkeypatch.setattr(ops.ResidualProjectedFunction, "apply", apply)


@needs_interpreter
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_project_out_matches_the_pytorch_path(name, autocast, monkeypatch):
    spy = _Spy(monkeypatch)
    ours, torch_path, x = _pair(name)
    _compare(ours, torch_path, x, autocast)
    assert spy.calls == 1  # every group's project_out in the one launch


@needs_vqp
@needs_interpreter
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bf16"])
@pytest.mark.parametrize("name", ["residual", "residual no bias", "grouped"])
def test_fused_project_out_matches_vqp(name, autocast, monkeypatch):
    spy = _Spy(monkeypatch)
    ours, reference, x = _pair(name, reference_cls=_vqp_class(name))
    _compare(ours, reference, x, autocast)
    assert spy.calls == 1
    with torch.no_grad():  # the decode (float32 weights, outside autocast) matches vqp's too
        indices = reference(x)[1]
        torch.testing.assert_close(ours.get_output_from_indices(indices), reference.get_output_from_indices(indices),
                                   rtol=1e-6, atol=1e-6)


@needs_interpreter
def test_kernel_sums_as_its_torch_twin():
    """The kernel's project_out (interpreted: products in float32 in channel order, the bias last, one rounding)
    equals ``_project_groups`` bit for bit, in float32 and bfloat16, with and without bias, with two groups."""
    tables = residual_tables((8, 5, 5, 5), 3, "current", "sym_clamp", "cpu", (8 / 7, 1.25, 1.25, 1.25))
    torch.manual_seed(3)
    x = torch.randn(2, 8, 37) * 2                       # (b, g*d, n): 2 groups of 4 channels
    for dtype in (torch.float32, torch.bfloat16):
        for has_bias in (True, False):
            w = torch.randn(2 * 24, 4).to(dtype)
            b = torch.randn(2 * 24).to(dtype) if has_bias else None
            proj, out, indices = ops.forward_triton(x, tables.stages, tables.guess, tables.channels, tables.basis, 2, 3,
                                                    1, False, w, b)
            plain_out, plain_indices = ops.forward_triton(x, tables.stages, tables.guess, tables.channels, tables.basis,
                                                          2, 3, 1, False)
            assert torch.equal(out, plain_out) and torch.equal(indices, plain_indices)
            expected = ops._project_groups(out, w, b, 2)
            assert proj.dtype == dtype and proj.shape == (2, 37, 48)
            assert torch.equal(proj, expected), (dtype, has_bias)


@needs_interpreter
def test_nan_token_projects_to_nan_like_nn_linear():
    m = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, dim=16, backend="triton")
    x = torch.randn(1, 5, 16)
    x[0, 2, 7] = float("nan")
    with torch.no_grad():
        quantized, indices = m(x)
        h = m.project_in(x)
    assert torch.isnan(quantized[0, 2]).all() and not torch.isnan(quantized[0, [0, 1, 3, 4]]).any()
    assert torch.equal(indices[0, 2], torch.full((3,), -1, dtype=indices.dtype)) == bool(torch.isnan(h[0, 2]).any())


class _LoRALinear(nn.Linear):
    pass


@needs_interpreter
@pytest.mark.parametrize("change", ["hook", "subclass", "half weights"])
def test_project_out_is_called_when_it_must_be(change, monkeypatch):
    """A hooked or subclassed project_out is called as a module (the hook fires), and bfloat16 weights outside
    autocast fail as vqp's module does (its project_out receives the float32 quantized sum)."""
    spy = _Spy(monkeypatch)
    m = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, dim=16, backend="triton")
    x = torch.randn(2, 5, 16)
    if change == "hook":
        seen = []
        m.project_out.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
        m(x)
        assert seen == [(2, 5, 16)]
    elif change == "subclass":
        lora = _LoRALinear(4, 16)
        lora.load_state_dict(m.project_out.state_dict())
        m.project_out = lora
        reference = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, dim=16, backend="torch")
        reference.load_state_dict(m.state_dict())
        assert torch.equal(m(x)[0], reference(x)[0])
    else:
        m.project_out.to(torch.bfloat16)
        with pytest.raises(RuntimeError, match="dtype"):
            m(x)
    assert spy.calls == 0


@needs_interpreter
def test_quantize_dropout_with_fused_project_out(monkeypatch):
    """Dropped stages give index -1 (int64, as vqp) and no codes in the projected output."""
    spy = _Spy(monkeypatch)
    kwargs = dict(levels=[5, 5, 5], num_quantizers=5, dim=16, quantize_dropout=True)
    ours = ResidualFSQ(**kwargs, backend="triton").train()
    torch_path = ResidualFSQ(**kwargs, backend="torch").train()
    torch_path.load_state_dict(ours.state_dict())
    x = torch.randn(1, 6, 16, requires_grad=True)
    for seed in range(6):
        qo, io = ours(x, rand_quantize_dropout_fixed_seed=seed)
        qt, it = torch_path(x, rand_quantize_dropout_fixed_seed=seed)
        assert io.dtype == it.dtype and torch.equal(io, it)
        torch.testing.assert_close(qo, qt, rtol=1e-5, atol=1e-6)
    assert spy.calls == 6


@needs_interpreter
def test_projected_op_passes_opcheck():
    """Schema, fake implementation, autograd registration and dispatch of fsq_triton::residual_quantize_projected."""
    tables = residual_tables((8, 5, 5, 5), 3, "current", "sym_clamp", "cpu", (8 / 7, 1.25, 1.25, 1.25))
    x = torch.randn(2, 8, 7, requires_grad=True)
    w = torch.randn(2 * 6, 4, requires_grad=True)
    for b in (torch.randn(2 * 6, requires_grad=True), None):
        torch.library.opcheck(torch.ops.fsq_triton.residual_quantize_projected.default,
                              (x, tables.stages, tables.guess, tables.channels, tables.basis, w, b, 2, 3,
                               ops.KINDS["sym_clamp"], 1, False))


@needs_interpreter
def test_torch_compile_fullgraph_with_fused_project_out():
    m = GroupedResidualFSQ(dim=32, groups=2, levels=[8, 5, 5, 5], num_quantizers=3, backend="triton")
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 7, 32)
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    qc, ic = compiled(xc)
    qe, ie = m(xe)
    assert torch.equal(ic, ie)
    torch.testing.assert_close(qc, qe, rtol=1e-6, atol=1e-6)
    qc.sum().backward()
    grads_c = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    qe.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)
    for gc, ge in zip(grads_c, (p.grad for p in m.parameters())):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)

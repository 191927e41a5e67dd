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
    # vqp's ResidualFSQ gives its projections a bias whatever projection_has_bias says (its stages take that
    # keyword); _pair replaces them with bias-free nn.Linear layers in both modules
    "residual no bias": (ResidualFSQ, dict(levels=[7, 5, 3], num_quantizers=5, dim=16),
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
    if "no bias" in name:
        for module in (ours, other):
            module.project_in = nn.Linear(module.project_in.in_features, module.project_in.out_features, bias=False)
            module.project_out = nn.Linear(module.project_out.in_features, module.project_out.out_features, bias=False)
    other.load_state_dict(ours.state_dict(), strict=True)
    assert ("no bias" in name) == (getattr(ours, "rvqs", [ours])[0].project_out.bias is None)
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
    """Counts the fused launches with ``project_out`` (the autograd.Function's calls; ``function``: another one's, such
    as ``ResidualProjectInOutFunction``, both projections fused)."""

    def __init__(self, monkeypatch, function=None):
        function = function or ops.ResidualProjectedFunction
        self.calls = 0
        original = function.apply

        def apply(*args):
            self.calls += 1
            return original(*args)

        monkeypatch.setattr(function, "apply", apply)


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
@pytest.mark.parametrize("fuse_project_in", [False, True], ids=["grouped-project_out", "residual-fuse_project_in"])
def test_torch_compile_fullgraph_with_fused_projections(fuse_project_in):
    """torch.compile(fullgraph=True) traces the projected ops: the same indices, outputs and gradients (input and
    every parameter) as eager."""
    if fuse_project_in:
        m = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, dim=16, backend="triton")
        m.fuse_project_in = True
    else:
        m = GroupedResidualFSQ(dim=32, groups=2, levels=[8, 5, 5, 5], num_quantizers=3, backend="triton")
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 7, 16 if fuse_project_in else 32)
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


# --------------------------------------------------------------------------------------------------
# fuse_project_in (opt-in): project_in in the kernel too
# --------------------------------------------------------------------------------------------------


def _InOutSpy(monkeypatch):
    return _Spy(monkeypatch, ops.ResidualProjectInOutFunction)


def _on_a_grid(module):
    """project_in's weights and biases on a coarse grid: with inputs on one too, every product and partial sum is exact
    in float32 and bfloat16, so any summation order gives nn.Linear's h, and the fused path must equal the torch path
    bit for bit in the indices."""
    with torch.no_grad():
        for rvq in getattr(module, "rvqs", [module]):
            rvq.project_in.weight.copy_(torch.randint(-8, 9, rvq.project_in.weight.shape) / 64)
            if rvq.project_in.bias is not None:
                rvq.project_in.bias.copy_(torch.randint(-8, 9, rvq.project_in.bias.shape) / 8)


@needs_interpreter
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_fuse_project_in_matches_the_pytorch_path_on_exact_sums(name, autocast, monkeypatch):
    spy, out_spy = _InOutSpy(monkeypatch), _Spy(monkeypatch)
    ours, torch_path, x = _pair(name)
    _on_a_grid(ours)
    torch_path.load_state_dict(ours.state_dict())
    ours.fuse_project_in = True
    x = torch.randint(-8, 9, x.shape).float() / 8
    _compare(ours, torch_path, x, autocast)
    assert spy.calls == 1 and out_spy.calls == 0  # one launch for project_in, the stages and project_out


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_project_in_on_random_inputs_is_the_kernel_path_on_its_own_h(dtype):
    """On random inputs the fused h may differ from nn.Linear's by an ulp (the reason it is opt-in); everything
    after it is the project_out-fused path's: the same indices, sums and projected rows from the kernel's own h, and
    that h within one rounding of the weights' dtype of the torch twin's."""
    tables = residual_tables((8, 5, 5, 5), 8, "current", "sym_clamp", "cpu", (8 / 7, 1.25, 1.25, 1.25))
    torch.manual_seed(4)
    x = torch.randn(2, 2 * 64, 29)
    w_in, b_in = (torch.randn(2 * 4, 64) / 8).to(dtype), torch.randn(2 * 4).to(dtype)
    w_out, b_out = torch.randn(2 * 64, 4).to(dtype), torch.randn(2 * 64).to(dtype)
    proj, h, out, indices = ops.forward_triton(x, tables.stages, tables.guess, tables.channels, tables.basis, 2, 8, 1,
                                               False, w_out, b_out, w_in, b_in)
    torch.testing.assert_close(h, ops._project_in_groups(x, w_in, b_in, 2), rtol=2 ** -7 if dtype != torch.float32 else 1e-6,
                               atol=1e-6)
    proj2, out2, indices2 = ops.forward_triton(h, tables.stages, tables.guess, tables.channels, tables.basis, 2, 8, 1,
                                               False, w_out, b_out)
    assert torch.equal(indices, indices2) and torch.equal(out, out2) and torch.equal(proj, proj2)


@needs_interpreter
def test_fuse_project_in_is_off_by_default_and_stands_aside(monkeypatch):
    """Off by default (vqp's indices need nn.Linear's h); on, a hooked project_in is called as a module."""
    spy = _InOutSpy(monkeypatch)
    assert ResidualFSQ.fuse_project_in is False
    m = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, dim=16, backend="triton")
    x = torch.randn(2, 5, 16)
    m(x)
    assert spy.calls == 0
    m.fuse_project_in = True
    m(x)
    assert spy.calls == 1
    seen = []
    m.project_in.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    m(x)
    assert spy.calls == 1 and seen == [(2, 5, 4)]
    grouped = GroupedResidualFSQ(dim=32, groups=2, levels=[8, 5, 5, 5], num_quantizers=2, backend="triton")
    grouped.fuse_project_in = True
    assert all(rvq.fuse_project_in for rvq in grouped.rvqs) and grouped.fuse_project_in
    grouped(torch.randn(2, 5, 32))
    assert spy.calls == 2


@needs_interpreter
def test_project_in_out_op_passes_opcheck_and_checks_shapes():
    tables = residual_tables((8, 5, 5, 5), 3, "current", "sym_clamp", "cpu", (8 / 7, 1.25, 1.25, 1.25))
    x = torch.randn(2, 2 * 16, 7, requires_grad=True)
    w_in, w_out = torch.randn(2 * 4, 16, requires_grad=True), torch.randn(2 * 16, 4, requires_grad=True)
    for b_in, b_out in ((torch.randn(8, requires_grad=True), torch.randn(32, requires_grad=True)), (None, None)):
        torch.library.opcheck(torch.ops.fsq_triton.residual_quantize_project_in_out.default,
                              (x, tables.stages, tables.guess, tables.channels, tables.basis, w_in, b_in, w_out, b_out, 2,
                               3, ops.KINDS["sym_clamp"], 1, False))
    with pytest.raises(ValueError, match=r"w_in must be \(8, 16\), found \(8, 15\)"):
        ops.forward_triton(x.detach(), tables.stages, tables.guess, tables.channels, tables.basis, 2, 3, 1, False,
                           w_out.detach(), None, torch.randn(2 * 4, 15), None)


@needs_interpreter
@pytest.mark.parametrize("bad, message", [
    (dict(w_out=torch.randn(13, 4)), r"w_out must be \(groups \* dim, 4\), found \(13, 4\)"),
    (dict(w_out=torch.randn(48)), r"w_out must be"),
    (dict(b_out=torch.randn(5)), r"b_out must be \(12,\), found \(5,\)"),
    (dict(w_out=torch.randint(0, 3, (12, 4)), b_out=None), r"floating dtype"),
    (dict(b_out=torch.randn(12, dtype=torch.float64)), r"b_out is torch.float64"),
])
@pytest.mark.parametrize("interpreted", [True, False], ids=["kernel", "torch-twin"])
def test_projected_op_refuses_bad_projections(bad, message, interpreted, monkeypatch):
    """The op says what is wrong with its projection tensors, on the kernel path and on its CPU twin (a short bias
    would otherwise be read past its end by the kernel)."""
    tables = residual_tables((8, 5, 5, 5), 3, "current", "sym_clamp", "cpu", (8 / 7, 1.25, 1.25, 1.25))
    args = dict(w_out=torch.randn(12, 4), b_out=torch.randn(12), **{})
    args.update(bad)
    if not interpreted:
        monkeypatch.setattr(ops, "_runs_triton", lambda t: False)
    with pytest.raises(ValueError, match=message):
        torch.ops.fsq_triton.residual_quantize_projected(torch.randn(2, 8, 5), tables.stages, tables.guess, tables.channels,
                                                         tables.basis, args["w_out"], args["b_out"], 2, 3,
                                                         ops.KINDS["sym_clamp"], 1, False)



@needs_interpreter
def test_grouped_calls_each_project_in_once_where_the_kernel_declines():
    """Under torch.func, and where the kernel declines the projected values (a scalar soft clamp under bfloat16
    autocast, pre-1.26), each group's project_in runs once, as in vqp (a hook fires once, a dropout draws once)."""
    from torch.func import grad

    for kwargs, autocast, transform in ((dict(), False, True),
                                        (dict(semantics="pre-1.26", soft_clamp_input_value=1.5), True, False)):
        m = GroupedResidualFSQ(dim=32, groups=2, levels=[8, 5, 5, 5], num_quantizers=2, backend="triton", **kwargs)
        calls = []
        for rvq in m.rvqs:
            rvq.project_in.register_forward_hook(lambda *args: calls.append(1))
        x = torch.randn(2, 5, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if transform:
                grad(lambda x: m(x)[0].sum())(x)
            else:
                m(x)
        assert len(calls) == 2


@needs_interpreter
def test_project_out_with_its_own_forward_is_called(monkeypatch):
    """A forward set on the instance (accelerate's offloading hooks do this) is called, not read past."""
    spy = _Spy(monkeypatch)
    m = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, dim=16, backend="triton")
    m.project_out.forward = lambda codes: torch.ones(*codes.shape[:-1], 16)
    assert torch.equal(m(torch.randn(2, 5, 16))[0], torch.ones(2, 5, 16))
    assert spy.calls == 0


@needs_interpreter
def test_float64_projection_under_autocast_raises_as_nn_linear_does(monkeypatch):
    """Autocast does not cast float64 weights, so vqp's nn.Linear raises on the bfloat16 input: so does fsq_triton
    (the module is called) instead of computing in bfloat16."""
    spy = _Spy(monkeypatch)
    m = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, dim=16, backend="triton")
    m.project_out.double()
    torch_path = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, dim=16, backend="torch")
    torch_path.project_out.double()
    for module in (torch_path, m):
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError):
            module(torch.randn(2, 5, 16))
    assert spy.calls == 0

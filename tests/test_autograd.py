"""Gradients wherever the PyTorch path has them, on the Triton path (kernels under the interpreter), nothing dropped.

The PyTorch path (``backend="torch"``: the reference's own ops, differentiated by autograd) is the oracle: every
test runs the same module state on both backends and compares. Covered: second-order gradients (a gradient
penalty) with and without projections, decode gradients with respect to ``project_out``, ``torch.library.opcheck``
on every op with the module's real arguments (``requires_grad`` included), and ``torch.func`` (grad, vmap, jvp,
jacrev, jacfwd, hessian) and forward-mode AD.
"""

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from fsq_triton import FSQ, level_tables, torch_impl


ops = torch.ops.fsq_triton

# (module kwargs, input shape): channel-first image without projections, a 2-codebook sequence, and projections
CASES = [
    pytest.param(dict(levels=[8, 5, 5, 5]), (2, 4, 3, 5), id="image"),
    pytest.param(dict(levels=[7, 6, 5], num_codebooks=2), (2, 7, 6), id="sequence-2-codebooks"),
    pytest.param(dict(levels=[8, 6, 5], dim=16), (2, 16, 3, 4), id="image-projections"),
    pytest.param(dict(levels=[8, 5, 5, 5], dim=12, num_codebooks=2), (2, 9, 12), id="sequence-projections"),
]


def pair(kwargs, seed=0, device="cpu"):
    """The same module on both backends (identical parameters)."""
    torch.manual_seed(seed)
    triton = FSQ(**kwargs, backend="triton").to(device)
    reference = copy.deepcopy(triton)
    reference.backend = "torch"
    return triton, reference


def inputs(shape, seed=1, scale=1.5, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(device)


def close(actual, expected, name, rtol=2e-4, atol=2e-5):
    assert actual is not None, f"{name}: no gradient"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def gradient_penalty(fsq, z):
    """``g = d sum(out^2) / d z`` with create_graph, then ``sum(g^2)`` differentiated w.r.t. z and every parameter."""
    z = z.detach().clone().requires_grad_()
    out, _ = fsq(z)
    (g,) = torch.autograd.grad(out.pow(2).sum(), z, create_graph=True)
    penalty = g.pow(2).sum()
    params = [p for p in fsq.parameters()]
    grads = torch.autograd.grad(penalty, [z, *params])
    return g.detach(), grads


@pytest.mark.parametrize("kwargs,shape", CASES)
def test_gradient_penalty_matches_torch_path(device, kwargs, shape):
    triton, reference = pair(kwargs, device=device)
    z = inputs(shape, device=device)
    g, grads = gradient_penalty(triton, z)
    ref_g, ref_grads = gradient_penalty(reference, z)
    close(g, ref_g, "first-order gradient")
    names = ["z"] + [name for name, _ in triton.named_parameters()]
    for name, actual, expected in zip(names, grads, ref_grads):
        assert expected.abs().sum() > 0, f"{name}: the oracle's second-order gradient is zero, the test would prove nothing"
        close(actual, expected, f"second-order gradient w.r.t. {name}")


@pytest.mark.parametrize("kwargs,shape", CASES[:2])
def test_third_order_gradient(device, kwargs, shape):
    """A backward of a backward of a backward: every level differentiable, as on the PyTorch path."""
    results = []
    for fsq in pair(kwargs, device=device):
        z = inputs(shape, seed=3, device=device).requires_grad_()
        out, _ = fsq(z)
        (g1,) = torch.autograd.grad(out.sum(), z, create_graph=True)
        (g2,) = torch.autograd.grad(g1.pow(2).sum(), z, create_graph=True)
        (g3,) = torch.autograd.grad(g2.sum(), z)
        results.append((g1, g2, g3))
    for name, actual, expected in zip(("g1", "g2", "g3"), *results):
        close(actual, expected, name, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_ops_double_backward_match_autograd_of_torch_path(device, channels_last):
    """The ops' own registered autograd (torch.ops.fsq_triton.*) supports create_graph too."""
    levels, c = (8, 5, 5, 5), 2
    tables = level_tables(levels, device)
    shape = (2, 11, c * len(levels)) if channels_last else (2, c * len(levels), 11)
    base = inputs(shape, seed=4, device=device)
    base = base.transpose(1, 2) if channels_last else base
    results = []
    for quantize in (
        lambda z: ops.quantize(z, tables.values, tables.integers, c, channels_last)[0],
        lambda z: torch_impl.quantize(z, tables, c)[0],
    ):
        z = base.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(quantize(z).pow(2).sum(), z, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), z)
        results.append((g, gg))
    close(results[0][0], results[1][0], "first order")
    close(results[0][1], results[1][1], "second order")


@pytest.mark.parametrize("keep_codebook_axis", [False, True])
def test_decode_trains_project_out(device, keep_codebook_axis):
    """indices_to_codes with projections backpropagates into project_out (decoder fine-tuning on stored tokens)."""
    kwargs = dict(levels=[8, 5, 5, 5], dim=12, num_codebooks=2 if keep_codebook_axis else 1)
    triton, reference = pair(kwargs, device=device)
    z = inputs((2, 12, 3, 4), device=device)
    _, indices = reference(z)
    grads = []
    for fsq in (triton, reference):
        decoded = fsq.indices_to_codes(indices)
        assert decoded.requires_grad, "decode with projections must be differentiable w.r.t. project_out"
        (decoded * torch.linspace(-1, 1, decoded.numel(), device=device).reshape(decoded.shape)).sum().backward()
        grads.append((fsq.project_out.weight.grad, fsq.project_out.bias.grad, decoded.detach()))
        assert fsq.project_in.weight.grad is None
    close(grads[0][2], grads[1][2], "decoded codes")
    close(grads[0][0], grads[1][0], "project_out.weight")
    close(grads[0][1], grads[1][1], "project_out.bias")


# --------------------------------------------------------------------------------------------------
# opcheck on every op, with the arguments the module really passes
# --------------------------------------------------------------------------------------------------


def test_opcheck_every_op_with_module_arguments(device):
    """The module's arguments built by hand, channel-first (the recorded calls below cover both layouts)."""
    channel_first = True
    torch.manual_seed(5)
    levels, c, dim = [8, 6, 5], 2, 16
    fsq = FSQ(levels, dim=dim, num_codebooks=c, backend="triton").to(device)
    plain = FSQ(levels, num_codebooks=c, backend="triton").to(device)
    tables = level_tables(tuple(levels), device)
    channels_last = not channel_first
    e = c * len(levels)
    # the feature views forward hands the ops: (b, e|dim, n), channel-first flattened or a transposed sequence
    z = inputs((2, 3, 4, e) if channels_last else (2, e, 3, 4), seed=6, device=device)
    z = (z.flatten(1, 2).transpose(1, 2) if channels_last else z.flatten(2)).requires_grad_()
    x = inputs((2, 3, 4, dim) if channels_last else (2, dim, 3, 4), seed=7, device=device)
    x = (x.flatten(1, 2).transpose(1, 2) if channels_last else x.flatten(2)).requires_grad_()
    w_in, b_in, w_out, b_out = fsq._projection_params()
    assert all(p.requires_grad for p in (w_in, b_in, w_out, b_out))
    indices = plain(z.detach().transpose(1, 2).reshape(2, 12, e))[1].reshape(2, 12, c)
    grad_out = inputs(z.shape, seed=8, device=device).requires_grad_()

    torch.library.opcheck(ops.quantize.default, (z, tables.values, tables.integers, c, channels_last))
    torch.library.opcheck(ops.quantize_backward.default, (grad_out, z, tables.values, channels_last))
    torch.library.opcheck(
        ops.indices_to_codes.default, (indices, tables.values, tables.integers, plain.codebook_size, channels_last, torch.float32)
    )
    torch.library.opcheck(
        ops.quantize_projected.default,
        (x, w_in, b_in, w_out, b_out, tables.values, tables.integers, c, channels_last, True),
    )
    torch.library.opcheck(
        ops.indices_to_codes_projected.default,
        (indices, w_out, b_out, tables.values, tables.integers, fsq.codebook_size, channels_last),
    )


@pytest.mark.parametrize("kwargs,shape", CASES)
def test_opcheck_on_the_calls_the_module_makes(device, kwargs, shape, monkeypatch):
    """Record every op call of a training step with a gradient penalty and a decode, then opcheck each op on
    exactly those arguments (the parameters and inputs still require grad there)."""
    import fsq_triton.ops.autograd as autograd_ops

    calls = {}
    real = autograd_ops.op_or_launcher

    def recording(op, launcher, *tensors):
        chosen = real(op, launcher, *tensors)

        def call(*args):
            # as they were, requires_grad included (detached: the step's graph is freed by the time opcheck runs)
            calls.setdefault(op, tuple(
                a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
            ))
            return op(*args)  # through the op itself, so that what is checked is what ran
        return call if chosen is launcher else chosen

    monkeypatch.setattr(autograd_ops, "op_or_launcher", recording)
    fsq, _ = pair(kwargs, device=device)
    z = inputs(shape, device=device).requires_grad_()
    out, indices = fsq(z)
    (g,) = torch.autograd.grad(out.pow(2).sum(), z, create_graph=True)
    (g.pow(2).sum() + out.sum()).backward()
    decoded = fsq.indices_to_codes(indices)
    if fsq.has_projections:
        decoded.sum().backward()
    expected = {"quantize_projected", "indices_to_codes_projected"} if fsq.has_projections else {"quantize"}
    expected |= {"quantize_backward", "indices_to_codes"}
    names = {op._qualified_op_name.split("::")[1] for op in calls}
    assert expected <= names, f"recorded {names}"
    assert any(a.requires_grad for args in calls.values() for a in args if isinstance(a, torch.Tensor))
    for op, args in calls.items():
        torch.library.opcheck(op.default, args)


# --------------------------------------------------------------------------------------------------
# torch.func and forward-mode AD
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,shape", CASES)
def test_func_grad(device, kwargs, shape):
    z = inputs(shape, device=device)
    results = [torch.func.grad(lambda z, f=fsq: f(z)[0].pow(2).sum())(z) for fsq in pair(kwargs, device=device)]
    close(results[0], results[1], "torch.func.grad")


@pytest.mark.parametrize("kwargs,shape", CASES)
def test_func_vmap(device, kwargs, shape):
    zs = torch.stack([inputs(shape, seed=s, device=device) for s in range(3)])
    results = [torch.func.vmap(fsq)(zs) for fsq in pair(kwargs, device=device)]
    (out, indices), (ref_out, ref_indices) = results
    assert torch.equal(indices, ref_indices)
    close(out, ref_out, "vmap out", rtol=1e-5, atol=1e-6)
    # vmap over a non-leading dim of the input, and of the decode
    zs = zs.movedim(0, -1)
    (out, indices), (ref_out, ref_indices) = [torch.func.vmap(fsq, in_dims=-1)(zs) for fsq in pair(kwargs, device=device)]
    assert torch.equal(indices, ref_indices)
    close(out, ref_out, "vmap(in_dims=-1) out", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,shape", CASES)
def test_func_vmap_of_grad(device, kwargs, shape):
    """Per-sample gradients: vmap(grad(f))."""
    zs = torch.stack([inputs(shape, seed=s, device=device) for s in range(3)])
    results = [torch.func.vmap(torch.func.grad(lambda z, f=fsq: f(z)[0].pow(3).sum()))(zs) for fsq in pair(kwargs, device=device)]
    close(results[0], results[1], "vmap(grad)")


@pytest.mark.parametrize("kwargs,shape", CASES)
def test_func_jvp_and_forward_ad(device, kwargs, shape):
    z, tangent = inputs(shape, device=device), inputs(shape, seed=9, device=device)
    jvps, duals = [], []
    for fsq in pair(kwargs, device=device):
        out, out_t = torch.func.jvp(lambda z, f=fsq: f(z)[0], (z,), (tangent,))
        jvps.append((out, out_t))
        with fwAD.dual_level():
            dual_out, _ = fsq(fwAD.make_dual(z, tangent))
            duals.append(fwAD.unpack_dual(dual_out).tangent)
    close(jvps[0][0], jvps[1][0], "jvp primal", rtol=1e-5, atol=1e-6)
    close(jvps[0][1], jvps[1][1], "jvp tangent")
    close(duals[0], duals[1], "forward-mode AD tangent")
    close(duals[0], jvps[0][1], "forward-mode AD == jvp")


@pytest.mark.parametrize("kwargs,shape", [
    pytest.param(dict(levels=[8, 5, 5]), (1, 2, 3), id="sequence"),
    pytest.param(dict(levels=[8, 5], dim=3), (1, 2, 3), id="sequence-projections"),
])
def test_func_jacobians_and_hessian(device, kwargs, shape):
    z = inputs(shape, device=device)
    results = []
    for fsq in pair(kwargs, device=device):
        f = lambda z, fsq=fsq: fsq(z)[0]  # noqa: E731
        results.append((
            torch.func.jacrev(f)(z),
            torch.func.jacfwd(f)(z),
            torch.func.hessian(lambda z: f(z).pow(2).sum())(z),
        ))
    for name, actual, expected in zip(("jacrev", "jacfwd", "hessian"), *results):
        close(actual, expected, name)


def test_func_grad_of_parameters(device):
    """torch.func.grad through functional_call, with respect to the projections' parameters."""
    triton, reference = pair(dict(levels=[8, 5, 5], dim=10), device=device)
    z = inputs((2, 5, 10), device=device)
    results = []
    for fsq in (triton, reference):
        params = dict(fsq.named_parameters())
        loss = lambda p, fsq=fsq: torch.func.functional_call(fsq, p, (z,))[0].pow(2).sum()  # noqa: E731
        results.append(torch.func.grad(loss)(params))
    for name in results[1]:
        close(results[0][name], results[1][name], name)


def test_func_vmap_over_projection_weights_is_a_clear_error(device):
    """Ensembles of projections (vmap over the weights) are not fused: a NotImplementedError that says what to do."""
    fsq = FSQ([8, 5, 5], dim=10, backend="triton").to(device)
    params = {name: torch.stack([p.detach()] * 2) for name, p in fsq.named_parameters()}
    z = inputs((2, 5, 10), device=device)
    run = lambda p: torch.func.functional_call(fsq, p, (z,))[0]  # noqa: E731
    with pytest.raises(NotImplementedError, match="vmap over the projection weights.*backend='torch'"):
        torch.func.vmap(run)(params)
    reference = copy.deepcopy(fsq)
    reference.backend = "torch"
    out = torch.func.vmap(lambda p: torch.func.functional_call(reference, p, (z,))[0])(params)
    assert out.shape == (2, 2, 5, 10)


def test_no_gradient_is_dropped_with_create_graph_on_plain_linear_input(device):
    """The issue's case: the penalty's gradient w.r.t. project_in.weight (31.07 on the kernels vs 56.08)."""
    triton, reference = pair(dict(levels=[8, 5, 5, 5], dim=16), seed=11, device=device)
    z = inputs((2, 16, 4, 4), seed=12, device=device)
    norms = []
    for fsq in (triton, reference):
        _, grads = gradient_penalty(fsq, z)
        norms.append(grads[1].norm())
    close(norms[0], norms[1], "norm of the penalty's gradient w.r.t. project_in.weight")


@pytest.mark.parametrize("dim", [None, 12], ids=["no-projections", "projections"])
def test_func_vmap_of_decode(device, dim):
    """vmap over indices_to_codes: the CPU range check looks at every sample (no .item() on a vmapped tensor)."""
    triton, reference = pair(dict(levels=[8, 5, 5, 5], dim=dim), device=device)
    indices = torch.randint(0, triton.codebook_size, (3, 2, 5), generator=torch.Generator().manual_seed(13)).to(device)
    decoded = torch.func.vmap(triton.indices_to_codes)(indices)
    torch.testing.assert_close(decoded, torch.func.vmap(reference.indices_to_codes)(indices), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(decoded[2], triton.indices_to_codes(indices[2]), rtol=0, atol=0)
    if device == "cpu":  # (on CUDA, where the check would cost a sync, out-of-range indices decode to NaN)
        indices[1, 0, 3] = triton.codebook_size
        with pytest.raises(IndexError, match=f"found {triton.codebook_size}"):
            torch.func.vmap(triton.indices_to_codes)(indices)


def test_func_vmap_of_the_ops_themselves(device):
    """torch.ops.fsq_triton.* called directly under vmap: each op's vmap rule folds the vmapped dim into the batch."""
    levels, c = (8, 5, 5, 5), 2
    tables = level_tables(levels, device)
    zs = inputs((3, 2, c * len(levels), 7), seed=14, device=device)
    gs = inputs(zs.shape, seed=15, device=device)
    out, indices = torch.func.vmap(lambda z: ops.quantize(z, tables.values, tables.integers, c, False))(zs)
    dz = torch.func.vmap(lambda g, z: ops.quantize_backward(g, z, tables.values, False))(gs, zs)
    decoded = torch.func.vmap(lambda i: ops.indices_to_codes(i, tables.values, tables.integers, 1000, False, torch.float32))(indices)
    for k in range(3):
        ref_out, ref_indices = ops.quantize(zs[k], tables.values, tables.integers, c, False)
        assert torch.equal(out[k], ref_out) and torch.equal(indices[k], ref_indices)
        assert torch.equal(dz[k], ops.quantize_backward(gs[k], zs[k], tables.values, False))
        assert torch.equal(decoded[k], ref_out)
    with pytest.raises(NotImplementedError, match="vmap over the level tables"):
        torch.func.vmap(lambda v: ops.quantize(zs[0], v, tables.integers, c, False))(tables.values[None].expand(2, -1, -1))

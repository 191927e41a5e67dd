"""orthogonal_rotation in the fused kernels (issue 11): ``z @ R`` before the thresholds and ``codes @ R.T`` after, per
token and codebook, in the forward kernel (``ROTATE``), and the backward recomputed from ``z``.

Oracle: the PyTorch backend, which runs vqp 1.32's ops (``h @ R`` with torch's matmul, the quantizer, ``codes @ R.T``)
and matches vqp's own golden file (tests/test_vqp_options.py). The kernel sums ``z @ R`` term by term in channel
order, mul then add, which is how torch's CPU matmul rounds a ``(m, d) @ (d, d)`` product for ``d <= 8`` (the tests
below check that too), so the indices agree bit for bit; ``codes @ R.T`` is summed in the kernel's own order, so
``out`` agrees to float32 rounding, as with the fused projections.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fsq_triton import FSQ
from fsq_triton.ops import autograd as fsq_autograd


def pair(device, **kwargs):
    """(kernel module, PyTorch module) with the same rotation buffer."""
    kwargs = dict(kwargs, orthogonal_rotation=True)
    fused = FSQ(**kwargs, backend="triton").to(device)
    plain = FSQ(**kwargs, backend="torch").to(device)
    plain.load_state_dict(fused.state_dict(), strict=True)
    return fused, plain


def record_rotation(monkeypatch, launcher: str, *logs: list) -> None:
    """Wrap ``fsq_autograd.<launcher>`` so that each call appends its ``rotation`` argument to every list in ``logs``."""
    launch = getattr(fsq_autograd, launcher)

    def recorded(*args, rotation=None, **kwargs):
        for log in logs:
            log.append(rotation)
        return launch(*args, rotation=rotation, **kwargs)

    monkeypatch.setattr(fsq_autograd, launcher, recorded)


@pytest.fixture
def spy(monkeypatch):
    """Records the ``rotation`` argument of every forward and backward launch (the forward's: the plain kernel's, or
    with fused projections the projected kernel's, which ``seen["projected"]`` also lists)."""
    seen = {"forward": [], "backward": [], "projected": []}
    record_rotation(monkeypatch, "forward_triton", seen["forward"])
    record_rotation(monkeypatch, "backward_triton", seen["backward"])
    record_rotation(monkeypatch, "forward_projected_triton", seen["forward"], seen["projected"])
    return seen


CASES = [
    # (FSQ kwargs, input shape)
    (dict(levels=[5, 5, 5]), (2, 37, 3)),                                       # sequence
    (dict(levels=[8, 5, 5, 5], num_codebooks=2), (2, 29, 8)),                  # two codebooks
    (dict(levels=[7, 5, 3], channel_first=True), (2, 3, 41)),                  # (b, d, n)
    (dict(levels=[5, 5, 5, 5], preserve_symmetry=True), (2, 4, 5, 6)),         # image, symmetric grid
    (dict(levels=[7, 4, 2], preserve_symmetry=True, bound_hard_clamp=True), (2, 3, 3, 2, 5)),  # video, hard clamp
    (dict(levels=[8, 6, 5, 5, 4, 3, 3, 3]), (3, 19, 8)),                        # d = 8
    (dict(levels=[8, 5, 5, 5], dim=12), (2, 17, 12)),                           # projections (nn.Linear) around it
]


@pytest.mark.parametrize("kwargs, shape", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_rotation_matches_the_torch_path(device, spy, kwargs, shape, dtype):
    fused, plain = pair(device, **kwargs)
    fused.to(dtype), plain.to(dtype)
    torch.manual_seed(0)
    z = (torch.randn(shape, device=device) * 2).to(dtype)
    if "dim" not in kwargs:  # an infinite input saturates (behind project_in it would make NaN tokens)
        z.view(-1)[:2] = torch.tensor([float("inf"), -3.0])
    zf, zp = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out, indices = fused(zf)
    out_ref, indices_ref = plain(zp)

    assert len(spy["forward"]) == 1 and spy["forward"][0] is not None, "the rotation did not run in the kernel"
    assert out.shape == out_ref.shape and out.dtype == out_ref.dtype == dtype
    assert torch.equal(indices, indices_ref)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, out_ref, **tol)

    g = torch.randn(out.shape, device=device, generator=None).to(dtype)
    out.backward(g)
    out_ref.backward(g)
    assert len(spy["backward"]) == 1 and spy["backward"][0] is not None
    torch.testing.assert_close(zf.grad, zp.grad, **(dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else tol))
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **(dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else tol),
                                   msg=lambda m: f"{name}: {m}")


def test_nan_token_gets_index_minus_one_and_nan_codes(device):
    fused, plain = pair(device, levels=[5, 5, 5], num_codebooks=2)
    z = torch.randn(1, 4, 6, device=device)
    z[0, 1, 4] = float("nan")                      # token 1, codebook 1
    with torch.no_grad():
        out, indices = fused(z)
        _, indices_ref = plain(z)
    assert indices[0, 1, 1] == -1 and indices[0, 1, 0] >= 0
    assert out[0, 1, 3:].isnan().all() and not out[0, 1, :3].isnan().any()
    mask = torch.ones_like(indices, dtype=torch.bool)
    mask[0, 1, 1] = False
    assert torch.equal(indices[mask], indices_ref[mask])


def test_kernel_summation_order_is_torch_cpu_matmul():
    """The premise of bitwise indices: torch's CPU ``(m, d) @ (d, d)`` for d <= 8 rounds as a mul-then-add chain in
    channel order, which the kernel (``rotate_codebooks``) reproduces under the interpreter."""
    torch.manual_seed(1)
    for d in range(2, 9):
        z = torch.randn(4096, 2, d) * 3
        rot = torch.empty(d, d)
        torch.nn.init.orthogonal_(rot)
        chained = torch.zeros(4096, 2, d)
        for k in range(d):
            chained = chained + z[..., k:k + 1] * rot[k]
        assert torch.equal(z @ rot, chained), f"d={d}"


def test_no_autograd_call_skips_the_function(device, spy, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the autograd.Function ran for a call that records nothing")

    monkeypatch.setattr(fsq_autograd.RotatedQuantizeFunction, "apply", refuse)
    fused, plain = pair(device, levels=[8, 5, 5, 5])
    z = torch.randn(2, 9, 4, device=device)
    with torch.no_grad():
        out, indices = fused(z)
        out_ref, indices_ref = plain(z)
    assert spy["forward"][0] is not None
    assert torch.equal(indices, indices_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)


def test_gradient_of_the_gradient_matches_the_torch_path(device):
    """create_graph=True: the backward is written in differentiable ops, so a gradient penalty works."""
    fused, plain = pair(device, levels=[7, 5, 5])
    z = torch.randn(2, 11, 3, device=device)
    results = []
    for module in (fused, plain):
        zz = z.clone().requires_grad_(True)
        out, _ = module(zz)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), zz, create_graph=True)
        (second,) = torch.autograd.grad(grad.pow(2).sum(), zz)
        results.append((grad.detach(), second))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)


def noisy_pair(device, p):
    fused, plain = pair(device, levels=[7, 5, 4], preserve_symmetry=True, noise_dropout=p)
    return fused.train(), plain


def test_noise_with_rotation_runs_in_the_kernel(device, spy, monkeypatch):
    """Training with noise: one kernel draws the noise between the two rotations; vqp's properties hold."""
    def no_torch_noise(self, codes):
        raise AssertionError("the torch-op noise ran")

    monkeypatch.setattr(FSQ, "_apply_noise", no_torch_noise)
    fused, plain = noisy_pair(device, 0.5)
    z = torch.randn(4, 256, 3, device=device)
    torch.manual_seed(7)
    out, indices = fused(z)
    torch.manual_seed(7)
    out_again, _ = fused(z)
    assert spy["forward"][0] is not None
    assert torch.equal(out, out_again), "not reproducible under torch.manual_seed"
    with torch.no_grad():
        codes_ref, indices_ref = plain.eval()(z)
    assert torch.equal(indices, indices_ref), "indices must come from the codes before the noise"
    rot = fused.orthogonal_rot
    noisy_codes = out.detach() @ rot                        # undo the rotation back (R orthogonal)
    clean_codes = codes_ref @ rot
    changed = (noisy_codes - clean_codes).abs() > 1e-5
    assert 0.4 < changed.float().mean().item() < 0.6        # p = 0.5 of the elements
    assert (noisy_codes - clean_codes).abs().max() <= 0.5 + 1e-5
    assert noisy_codes.abs().max() <= 1.0 + 1e-5


def test_noise_with_rotation_gradient_follows_the_clamp(device):
    """p = 1: every element is noised; where the clamp cut, no gradient reaches that rotated channel."""
    fused, _ = noisy_pair(device, 1.0)
    z = torch.randn(2, 64, 3, device=device).requires_grad_(True)
    out, _ = fused(z)
    rot = fused.orthogonal_rot
    g = torch.randn_like(out)
    out.backward(g)
    noisy = out.detach() @ rot
    cut = (noisy.abs() - 1.0).abs() < 1e-6
    # reference: straight-through factor of the symmetric tanh at y = z @ R, zeroed where cut (a cut-free noisy code
    # of exactly +-1 has probability 0 under U(-1/2, 1/2))
    y = z.detach() @ rot
    half = torch.tensor([7, 5, 4], device=device, dtype=torch.float32) - 1
    factor = (2.0 / half) * (half / 2.0) * (1 - y.tanh() ** 2)
    g_y = torch.where(cut, 0.0, (g @ rot) * factor)
    torch.testing.assert_close(z.grad, g_y @ rot.t(), rtol=1e-5, atol=1e-6)


def test_noise_with_rotation_refuses_a_gradient_graph(device):
    fused, _ = noisy_pair(device, 0.5)
    z = torch.randn(2, 8, 3, device=device).requires_grad_(True)
    out, _ = fused(z)
    with pytest.raises(NotImplementedError, match="create_graph"):
        torch.autograd.grad(out.sum(), z, create_graph=True)


def test_traced_and_transformed_calls_keep_the_torch_products(device, spy):
    """torch.func and dispatch modes see the products as torch ops around the fused quantizer (no ROTATE launch)."""
    fused, plain = pair(device, levels=[5, 5, 5])
    z = torch.randn(2, 7, 3, device=device)
    grad = torch.func.grad(lambda t: fused(t)[0].pow(2).sum())(z)
    zz = z.clone().requires_grad_(True)
    plain(zz)[0].pow(2).sum().backward()
    torch.testing.assert_close(grad, zz.grad, rtol=1e-5, atol=1e-6)
    with FlopCounterMode(display=False) as counter:
        fused(z)
    assert counter.get_total_flops() > 0                      # the matmuls are visible to the mode
    assert all(r is None for r in spy["forward"])


@pytest.mark.parametrize("kwargs, shape", [
    (dict(levels=[8, 5, 5, 5], num_codebooks=2), (2, 9, 2)),       # (b, n, c) -> (b, n, 8)
    (dict(levels=[7, 5, 3], channel_first=True), (2, 11)),           # (b, n) -> (b, 3, n)
    (dict(levels=[5, 5, 5, 5]), (2, 3, 4)),                           # image (b, h, w) -> (b, 4, h, w)
    (dict(levels=[8, 5, 5, 5], dim=6), (2, 7)),                       # then project_out
], ids=str)
def test_decode_rotates_in_the_kernel(device, monkeypatch, kwargs, shape):
    seen = []
    record_rotation(monkeypatch, "decode_triton", seen)
    fused, plain = pair(device, **kwargs)
    indices = torch.randint(0, fused.codebook_size, shape, device=device)
    with torch.no_grad():
        codes = fused.indices_to_codes(indices)
        codes_ref = plain.indices_to_codes(indices)
        unprojected = fused.indices_to_codes(indices, project_out=False)
        unprojected_ref = plain.indices_to_codes(indices, project_out=False)
    assert seen and all(r is not None for r in seen), "the rotation did not run in the decode kernel"
    assert codes.shape == codes_ref.shape and codes.dtype == codes_ref.dtype
    torch.testing.assert_close(codes, codes_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unprojected, unprojected_ref, rtol=1e-6, atol=1e-6)


def test_decode_inverts_the_forward(device):
    fused, _ = pair(device, levels=[8, 5, 5, 5], num_codebooks=2)
    z = torch.randn(2, 13, 8, device=device)
    with torch.no_grad():
        out, indices = fused(z)
        torch.testing.assert_close(fused.indices_to_codes(indices), out, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# With fused projections: project_in, h_c @ R, the quantizer, code_c @ R.T and project_out in one kernel
# --------------------------------------------------------------------------------------------------

PROJECTED = [
    # (FSQ kwargs, input shape)
    (dict(levels=[8, 5, 5, 5], dim=12), (2, 17, 12)),                                      # sequence
    (dict(levels=[7, 5, 3], dim=10, num_codebooks=2), (2, 9, 10)),                          # 2 codebooks of 3 (e = 6)
    (dict(levels=[8, 5, 5, 5], dim=20, num_codebooks=2), (2, 20, 3, 5)),                    # image, channel-first
    (dict(levels=[5, 5, 5], dim=7, channel_first=True, preserve_symmetry=True), (2, 7, 13)),  # (b, dim, n)
]


class LinearRoundingOnce(torch.nn.Linear):
    """``nn.Linear`` whose output is rounded to the weights' dtype once, from float32 ``x W^T + b``: what the fused
    kernel computes, and what cuBLAS gives on a GPU. Torch's CPU ``nn.Linear`` in bfloat16 with a bias rounds ``x W^T``
    to bfloat16 before adding the bias (twice), which moves some ``h`` by an ulp and, now and then, an index; the
    oracle's ``project_in`` is this one where that matters (bfloat16 with a bias), so the comparison stays exact."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(x.float(), self.weight.float(), bias).to(self.weight.dtype)


def round_project_in_once(plain):
    """Swap the oracle's ``project_in`` for a :class:`LinearRoundingOnce` with the same parameters."""
    old = plain.project_in
    new = LinearRoundingOnce(old.in_features, old.out_features, bias=old.bias is not None,
                             device=old.weight.device, dtype=old.weight.dtype)
    new.load_state_dict(old.state_dict())
    plain.project_in = new


def close_grads(fused, plain, dtype):
    """Every parameter's gradient, the fused module's against the PyTorch module's."""
    params = dict(plain.named_parameters())
    assert params.keys() == dict(fused.named_parameters()).keys()
    for name, p in fused.named_parameters():
        q = params[name]
        if dtype == torch.float32:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        else:  # half-precision sums with cancellation: tolerance relative to the tensor's scale
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-2 * max(1.0, q.grad.abs().max().item()),
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kwargs, shape", PROJECTED, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projected_rotation_matches_the_torch_path(device, spy, kwargs, shape, bias, dtype):
    """The fused projected kernel with ``ROTATE`` (one launch, no plain quantizer) against vqp's ops: indices bit for
    bit, ``out`` to float32 rounding (bfloat16: the weights' rounding), the gradient of the input and every parameter
    (the backward: cuBLAS products around the rotated straight-through kernel, on the saved ``h``)."""
    fused, plain = pair(device, **kwargs, projection_has_bias=bias)
    fused.to(dtype), plain.to(dtype)
    if dtype == torch.bfloat16 and bias:
        round_project_in_once(plain)
    torch.manual_seed(2)
    z = (torch.randn(shape, device=device) * 2).to(dtype)
    zf, zp = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out, indices = fused(zf)
    out_ref, indices_ref = plain(zp)

    assert len(spy["projected"]) == 1 and spy["projected"][0] is not None, "the fused kernel did not rotate"
    assert len(spy["forward"]) == 1, "a plain quantizer launch ran beside the fused projections"
    assert out.shape == out_ref.shape and out.dtype == out_ref.dtype == dtype
    assert torch.equal(indices, indices_ref)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, out_ref, **tol)

    g = torch.randn(out.shape, device=device).to(dtype)
    out.backward(g)
    out_ref.backward(g)
    assert spy["backward"] and all(r is not None for r in spy["backward"]), "the backward did not rotate"
    torch.testing.assert_close(zf.grad, zp.grad, **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else
                                                   dict(rtol=2e-2, atol=2e-2 * max(1.0, zp.grad.abs().max().item()))))
    close_grads(fused, plain, dtype)


def test_projected_rotation_saves_h_before_the_rotation(device, monkeypatch):
    """The saved ``h`` is ``x W_in^T + b_in`` itself (the backward rotates it again), not ``h @ R``."""
    saved = []
    projected = fsq_autograd.forward_projected_triton

    def keep_h(*args, **kwargs):
        result = projected(*args, **kwargs)
        saved.append(result[2])
        return result

    monkeypatch.setattr(fsq_autograd, "forward_projected_triton", keep_h)
    fused, _ = pair(device, levels=[8, 5, 5, 5], dim=12, num_codebooks=2)
    z = torch.randn(2, 5, 12, device=device, requires_grad=True)
    fused(z)
    with torch.no_grad():
        h = fused.project_in(z)
    assert saved[0].shape == h.shape
    torch.testing.assert_close(saved[0], h, rtol=1e-6, atol=1e-6)


def test_projected_rotation_gradient_of_the_gradient(device, spy):
    """create_graph=True through the fused projections with rotation: a gradient penalty on the input and the
    weights, differentiated again, as the PyTorch path gives it."""
    fused, plain = pair(device, levels=[7, 5, 5], dim=9, num_codebooks=2)
    z = torch.randn(2, 11, 9, device=device)
    results = []
    for module in (fused, plain):
        zz = z.clone().requires_grad_(True)
        params = [zz, *module.parameters()]
        out, _ = module(zz)
        grads = torch.autograd.grad(out.pow(2).sum(), params, create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), params)
        results.append(([g.detach() for g in grads], second))
    assert spy["projected"] and spy["projected"][0] is not None
    for ours, theirs in zip(results[0][0] + list(results[0][1]), results[1][0] + list(results[1][1])):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_projected_rotation_without_autograd_skips_the_function(device, spy, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the autograd.Function ran for a call that records nothing")

    monkeypatch.setattr(fsq_autograd.RotatedProjectedFunction, "apply", refuse)
    fused, plain = pair(device, levels=[8, 5, 5, 5], dim=12)
    z = torch.randn(2, 9, 12, device=device)
    with torch.no_grad():
        out, indices = fused(z)
        out_ref, indices_ref = plain(z)
    assert spy["projected"] == [spy["projected"][0]] and spy["projected"][0] is not None
    assert torch.equal(indices, indices_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("return_indices", [True, False])
def test_projected_rotation_counts_usage(device, spy, return_indices):
    """track_usage with the rotation in the fused kernel: the kernel counts the rotated codes (vqp's indices), with
    or without storing them."""
    fused, plain = pair(device, levels=[8, 5, 5, 5], dim=12, num_codebooks=2, track_usage=True,
                        return_indices=return_indices)
    z = torch.randn(3, 21, 12, device=device)
    with torch.no_grad():
        out, indices = fused(z)
        out_ref, indices_ref = plain(z)
    assert spy["projected"][0] is not None
    assert (indices is None) == (not return_indices)
    if return_indices:
        assert torch.equal(indices, indices_ref)
    assert fused.usage_counts.sum() == 3 * 21 * 2
    assert torch.equal(fused.usage_counts, plain.usage_counts)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)


def test_projected_rotation_nan_token(device):
    """A NaN feature makes every ``y`` of its token's codebooks NaN: index -1, NaN out (as vqp)."""
    fused, plain = pair(device, levels=[5, 5, 5], dim=8)
    z = torch.randn(1, 5, 8, device=device)
    z[0, 2, 3] = float("nan")
    with torch.no_grad():
        out, indices = fused(z)
        out_ref, indices_ref = plain(z)
    assert indices[0, 2] == -1 and torch.equal(indices, indices_ref)
    assert out[0, 2].isnan().all() and not out[0, [0, 1, 3, 4]].isnan().any()


def test_projected_rotation_refuses_a_bad_rotation(device):
    """The launchers read ``R`` as d*d float32 values: another shape, dtype or layout is a clear error."""
    from fsq_triton.levels import level_tables
    from fsq_triton.ops import fsq_projected

    fused, _ = pair(device, levels=[8, 5, 5, 5], dim=12)
    tables = level_tables(fused.levels, device, fused.bound_kind)
    (w_in, b_in, w_out, b_out) = (t.detach() for t in fused._projection_params())
    x = torch.randn(1, 12, 5, device=device)
    rot = fused.orthogonal_rot.float()
    for bad in (rot[:3, :3].contiguous(), rot.double(), rot.t()):
        with pytest.raises(ValueError, match="rotation must be a contiguous float32 \\(4, 4\\)"):
            fsq_projected.forward_projected_triton(x, w_in, b_in, w_out, b_out, tables.values, tables.integers, 1,
                                                   True, False, rotation=bad)
        with pytest.raises(ValueError, match="rotation must be a contiguous float32"):
            fsq_projected.decode_projected_triton(torch.zeros(1, 5, 1, dtype=torch.int32, device=device), w_out, b_out,
                                                  tables.values, tables.integers, fused.codebook_size, True, rotation=bad)


def test_projected_rotation_under_transforms_keeps_the_modules(device, spy):
    """torch.func and dispatch modes: the projections and the rotation stay torch ops (no projected launch)."""
    fused, plain = pair(device, levels=[5, 5, 5], dim=6)
    z = torch.randn(2, 7, 6, device=device)
    grad = torch.func.grad(lambda t: fused(t)[0].pow(2).sum())(z)
    zz = z.clone().requires_grad_(True)
    plain(zz)[0].pow(2).sum().backward()
    torch.testing.assert_close(grad, zz.grad, rtol=1e-5, atol=1e-6)
    with FlopCounterMode(display=False) as counter:
        fused(z)
    assert counter.get_total_flops() > 0
    assert spy["projected"] == [] and all(r is None for r in spy["forward"])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("image", [False, True], ids=["sequence", "image"])
def test_projected_decode_rotates_in_the_kernel(device, monkeypatch, bias, dtype, image):
    """indices_to_codes with project_out fused: ``code_c @ R.T`` then project_out in the one decode kernel, against
    the PyTorch path; the gradient of the projection's parameters (decoder fine-tuning); decoding the forward's
    indices gives back its ``out``."""
    seen = []
    record_rotation(monkeypatch, "decode_projected_triton", seen)
    fused, plain = pair(device, levels=[8, 5, 5, 5], dim=10, num_codebooks=2, projection_has_bias=bias)
    fused.to(dtype), plain.to(dtype)
    shape = (2, 3, 4, 2) if image else (2, 9, 2)
    indices = torch.randint(0, fused.codebook_size, shape, device=device)
    codes = fused.indices_to_codes(indices)
    codes_ref = plain.indices_to_codes(indices)
    assert seen and all(r is not None for r in seen), "the rotation did not run in the fused decode"
    assert codes.shape == codes_ref.shape and codes.dtype == codes_ref.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(codes, codes_ref, **tol)
    g = torch.randn(codes.shape, device=device).to(dtype)
    codes.backward(g)
    codes_ref.backward(g)
    for name in ("project_out.weight",) + (("project_out.bias",) if bias else ()):
        ours, theirs = fused.get_parameter(name).grad, plain.get_parameter(name).grad
        torch.testing.assert_close(ours, theirs, **(tol if dtype == torch.float32 else
                                                    dict(rtol=2e-2, atol=2e-2 * max(1.0, theirs.abs().max().item()))))
    assert fused.project_in.weight.grad is None

    z = torch.randn((2, 10, 3, 4) if image else (2, 9, 10), device=device).to(dtype)
    with torch.no_grad():
        out, forward_indices = fused(z)
        torch.testing.assert_close(fused.indices_to_codes(forward_indices), out, **tol)


@pytest.mark.parametrize("dim", [None, 12], ids=["no-projections", "projections"])
def test_jit_trace_with_rotation_records_the_ops(device, dim):
    """torch.jit.trace records no kernel launch: while tracing, the rotation stays torch matmuls around the custom
    ops (which the trace holds), with and without projections; the traced program is the module's."""
    fused, _ = pair(device, levels=[8, 5, 5, 5], dim=dim)
    channels = fused.dim
    z = torch.randn(2, channels, 3, 4, device=device)
    traced = torch.jit.trace(fused, (z,), check_trace=False)
    z2 = torch.randn(2, channels, 3, 4, device=device)
    out, indices = traced(z2)
    with torch.no_grad():
        ref_out, ref_indices = fused(z2)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert any("fsq_triton::" in node.kind() for node in traced.inlined_graph.nodes())


@pytest.mark.parametrize("dim", [None, 12], ids=["no-projections", "projections"])
def test_forward_mode_ad_with_rotation(device, dim):
    """Forward-mode AD (dual tensors): the rotated kernels' Functions have no jvp, so while a dual level is open the
    rotation stays torch matmuls around the fused quantizer (whose Function has one); the tangent is the PyTorch
    path's."""
    import torch.autograd.forward_ad as fwAD

    fused, plain = pair(device, levels=[8, 5, 5, 5], dim=dim)
    z = torch.randn(2, 5, fused.dim, device=device)
    tangent = torch.randn_like(z)
    results = []
    for module in (fused, plain):
        with fwAD.dual_level():
            out, indices = module(fwAD.make_dual(z, tangent))
            primal, out_t = fwAD.unpack_dual(out)
            results.append((primal, out_t, indices))
    assert torch.equal(results[0][2], results[1][2])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("return_indices", [True, False])
@pytest.mark.parametrize("channel_first", [False, True])
def test_plain_rotation_counts_usage(device, spy, return_indices, channel_first):
    """track_usage with the rotation in the plain forward kernel (its (tokens, codebooks) index tile counted with
    atomics): the counts are the PyTorch path's, a NaN token counts nowhere, with or without storing the indices."""
    fused, plain = pair(device, levels=[8, 5, 5, 5], num_codebooks=2, track_usage=True, return_indices=return_indices,
                        channel_first=channel_first)
    z = torch.randn(3, 8, 21, device=device) if channel_first else torch.randn(3, 21, 8, device=device)
    nan_at = (0, 5, 2) if channel_first else (0, 2, 5)   # token 2, codebook 1
    z[nan_at] = float("nan")
    with torch.no_grad():
        fused(z)
        plain(z)
        fused(z)
    assert spy["forward"] and all(r is not None for r in spy["forward"])
    counts_ref = plain.usage_counts * 2
    assert torch.equal(fused.usage_counts, counts_ref)
    assert fused.usage_counts[0].sum() == 2 * 3 * 21 and fused.usage_counts[1].sum() == 2 * (3 * 21 - 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bfloat16_decode_rotates_float32_codes(backend, device):
    """Every path rotates float32 codes and rounds to the weights' dtype once, after ``R.T`` (as vqp and the forward):
    with bfloat16 projections the decode gives back the forward's ``out`` (the torch-op rotation rounded the codes to
    bfloat16 before rotating them: 1 bfloat16 ulp off)."""
    torch.manual_seed(0)
    fsq = FSQ([7, 7, 7], dim=6, orthogonal_rotation=True, backend=backend).to(device).to(torch.bfloat16)
    z = torch.randn(2, 33, 6, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        out, indices = fsq(z)
        decoded = fsq.indices_to_codes(indices)
    assert torch.equal(decoded, out)


def test_kernels_refuse_a_rotation_they_would_read_wrong(device):
    """The launchers read ``R`` as d*d contiguous float32 values: a transposed view or another dtype is a ValueError."""
    from fsq_triton import level_tables
    from fsq_triton import ops as fsq_ops

    tables = level_tables([5, 5, 5], device)
    z = torch.randn(1, 3, 8, device=device)
    rot = torch.linalg.qr(torch.randn(3, 3))[0].contiguous().to(device)
    with pytest.raises(ValueError, match="contiguous float32"):
        fsq_ops.apply_quantize_rotated(z, rot.t(), tables.values, tables.integers, 1, False, True, None, None)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        fsq_ops.decode_rotated(torch.zeros(1, 8, 1, dtype=torch.int32, device=device), rot[:2], tables.values,
                               tables.integers, 125, True, torch.float32)

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


@pytest.fixture
def spy(monkeypatch):
    """Records the ``rotation`` argument of every forward and backward launch."""
    seen = {"forward": [], "backward": []}
    forward, backward = fsq_autograd.forward_triton, fsq_autograd.backward_triton

    def forward_spy(*args, rotation=None, **kwargs):
        seen["forward"].append(rotation)
        return forward(*args, rotation=rotation, **kwargs)

    def backward_spy(*args, rotation=None, **kwargs):
        seen["backward"].append(rotation)
        return backward(*args, rotation=rotation, **kwargs)

    monkeypatch.setattr(fsq_autograd, "forward_triton", forward_spy)
    monkeypatch.setattr(fsq_autograd, "backward_triton", backward_spy)
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
    decode = fsq_autograd.decode_triton

    def decode_spy(*args, rotation=None, **kw):
        seen.append(rotation)
        return decode(*args, rotation=rotation, **kw)

    monkeypatch.setattr(fsq_autograd, "decode_triton", decode_spy)
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

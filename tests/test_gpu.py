"""Bitwise parity on a CUDA GPU: the compiled Triton kernels against the PyTorch path on the same GPU.

Run with ``TRITON_INTERPRET=0 pytest -m gpu`` on a machine with a CUDA GPU (about 40 GB of free GPU
memory for the largest test); everywhere else these tests are skipped. ``backend="torch"`` performs
the reference's own ops on the GPU, so the default (Triton) backend must reproduce it bit for bit:
indices, and outputs compared as int32 bit patterns. Gradients must agree within 1e-5.

The helpers take ``device`` and sizes as arguments so that the same checks can be exercised on small
CPU tensors under the interpreter (see ``test_gpu_checks_on_cpu`` at the bottom, not marked gpu).
"""

import gc

import pytest
import torch

from conftest import assert_bitwise_equal, gpu_available, interpreting

from fsq_triton import FSQ, level_tables

requires_gpu = pytest.mark.skipif(
    not gpu_available(), reason="needs a CUDA GPU with compiled kernels: TRITON_INTERPRET=0 pytest -m gpu"
)
gpu = [pytest.mark.gpu, requires_gpu]

LEVEL_SETS = [
    [8, 8, 8, 5, 5, 5],
    [8, 5, 5, 5],
    [7, 5, 5, 5, 5],
    [2, 3, 4, 5],
    [16, 16],
    [6, 6, 6],
    [26, 27, 38],
    [65, 3],
    [1000, 1000],
]
IDS = ["x".join(map(str, lv)) for lv in LEVEL_SETS]


@pytest.fixture(autouse=True)
def free_gpu_memory():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def assert_same_indices(a, b, msg="indices"):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{msg}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    mismatches = (a != b).sum().item()
    assert mismatches == 0, f"{msg}: {mismatches} of {a.numel()} differ"


def pair(levels, device, **kwargs):
    """(default backend, torch backend) modules with the same parameters, on ``device``."""
    torch.manual_seed(0)
    ours = FSQ(levels, **kwargs).to(device)
    ref = FSQ(levels, backend="torch", **kwargs).to(device)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def check_forward_parity(levels, z, **kwargs):
    ours, ref = pair(levels, z.device, **kwargs)
    with torch.no_grad():
        out, indices = ours(z)
        ref_out, ref_indices = ref(z)
    assert out.dtype == z.dtype
    assert_same_indices(indices, ref_indices)
    assert_bitwise_equal(out, ref_out, "out")
    return indices


def planted_input(levels, device, tokens, dtype, channels_last, generator):
    """Random tokens with every calibrated threshold of each channel and its float32 neighbours planted.

    Returns a sequence ``(1, tokens, d)`` (channel-last) or an image ``(1, d, 1, tokens)`` (channel-first).
    """
    d = len(levels)
    thresholds = level_tables(tuple(levels), device).thresholds.float().cpu()
    z = torch.randn(d, tokens, generator=generator) * 2
    for j in range(d):
        thr = thresholds[j][thresholds[j].isfinite()]  # the padding (NaN or +inf) is no threshold
        down, up = torch.nextafter(thr, torch.tensor(-float("inf"))), torch.nextafter(thr, torch.tensor(float("inf")))
        values = torch.cat([thr, down, up, torch.nextafter(down, torch.tensor(-float("inf")))])
        if dtype != torch.float32:  # the thresholds as the dtype can hold them, and their neighbours there
            near = values.to(dtype)
            values = torch.cat([near, torch.nextafter(near, torch.tensor(-float("inf"), dtype=dtype)),
                                torch.nextafter(near, torch.tensor(float("inf"), dtype=dtype))]).float()
        assert len(values) <= tokens
        pos = torch.randperm(tokens, generator=generator)[: len(values)]
        z[j, pos] = values
    z = z.to(dtype).to(device)
    if channels_last:
        return z.t().unsqueeze(0)  # (1, tokens, d), non-contiguous view of (d, tokens): any strides work
    return z.reshape(1, d, 1, tokens)


def flips_at_ties(ours, z, indices, ref_indices, max_fraction=1e-3):
    """The tokens whose indices differ between the fused projection and ``nn.Linear`` (cuBLAS), as a mask over
    ``indices`` without the codebook axis. Their sums run in different orders, so a channel of ``project_in``'s
    output that lies within float32 rounding of a calibrated threshold may land on either side. Asserted: every
    flip is such a tie (the float64 product lies within the summation error bound plus an ulp of a threshold),
    and flips are rare. Without projections nothing may differ."""
    differ = indices != ref_indices
    if ours.keep_num_codebooks_dim:
        differ_books = differ
    else:
        differ_books = differ.unsqueeze(-1)
    if not ours.has_projections or not differ.any():
        assert_same_indices(indices, ref_indices)
        return differ_books.any(-1)
    x = (z.movedim(1, -1) if z.ndim >= 4 else z).double()           # (b, *spatial, dim)
    w, bias = ours.project_in.weight.double(), ours.project_in.bias.double()
    h = x @ w.t() + bias                                              # (b, *spatial, e), exact enough
    bound = (x.abs() @ w.abs().t()) * x.shape[-1] * 2.0**-24 + h.abs() * 2.0**-23  # summation error + rounding
    d = ours.codebook_dim
    thresholds = level_tables(tuple(ours.levels), z.device).thresholds.double().repeat(ours.num_codebooks, 1)
    distance = (h[..., None] - thresholds).abs().nan_to_num(float("inf")).amin(-1)   # (b, *spatial, e)
    tie = (distance <= bound).reshape(*h.shape[:-1], ours.num_codebooks, d).any(-1)  # (b, *spatial, c)
    not_ties = (differ_books & ~tie).sum().item()
    assert not_ties == 0, f"{not_ties} index flips away from any threshold tie"
    fraction = differ_books.any(-1).float().mean().item()
    assert fraction <= max_fraction, f"{fraction:.2e} of the tokens flipped at ties"
    return differ_books.any(-1)


def check_gradient(levels, z, grad_out, **kwargs):
    """Gradients against the torch path. With projections a rare index flip at a tie is allowed
    (:func:`flips_at_ties`); the upstream gradient is zeroed on flipped tokens, whose codes legitimately differ."""
    ours, ref = pair(levels, z.device, **kwargs)
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out, indices = ours(z1)
    ref_out, ref_indices = ref(z2)
    flipped = flips_at_ties(ours, z, indices, ref_indices)          # (b, *spatial)
    keep = ~(flipped[:, None] if z.ndim >= 4 else flipped[..., None])
    grad_out = grad_out * keep
    out.backward(grad_out)
    ref_out.backward(grad_out)
    tol = dict(rtol=0, atol=1e-5) if z.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(z1.grad, z2.grad, **tol)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():  # sums over every token, in another order: scale the tolerance
        expected = ref_params[name].grad
        atol = 1e-5 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=atol, msg=name)


def check_decode(levels, indices, **kwargs):
    ours, ref = pair(levels, indices.device, **kwargs)
    for project_out in (True, False):
        with torch.no_grad():
            codes = ours.indices_to_codes(indices, project_out=project_out)
            ref_codes = ref.indices_to_codes(indices, project_out=project_out)
        if project_out and ours.has_projections:
            torch.testing.assert_close(codes, ref_codes, rtol=0, atol=1e-5)
        else:
            assert_bitwise_equal(codes, ref_codes, f"codes project_out={project_out}")


def check_huge(levels, shape, channel_first, samples, device, block):
    """More than 2**31 elements: the kernels' 64-bit offsets. Compare slices at ``samples`` token positions
    (start, around the 2**31 element offset, middle, end) with the torch path applied to those slices."""
    ours = FSQ(levels).to(device)
    ref = FSQ(levels, backend="torch").to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(shape, device=device, generator=gen)
    z.mul_(2)
    with torch.no_grad():
        out, indices = ours(z)
    if device != "cpu" or not interpreting():
        assert z.numel() > 2**31 or device == "cpu"
    n = shape[-1] if channel_first else shape[1]
    for start in samples:
        start = max(0, min(start, n - block))
        sl = slice(start, start + block)
        zs = z[..., sl] if channel_first else z[:, sl]
        with torch.no_grad():
            ref_out, ref_idx = ref(zs)
        got_out = out[..., sl] if channel_first else out[:, sl]
        got_idx = indices[..., sl] if channel_first else indices[:, sl]
        assert_same_indices(got_idx, ref_idx, f"indices at token {start}")
        assert_bitwise_equal(got_out, ref_out, f"out at token {start}")
    del out
    # decode every index back (the decode kernel's 64-bit offsets) and compare the same slices
    with torch.no_grad():
        codes = ours.indices_to_codes(indices)
    assert codes.shape == z.shape
    for start in samples:
        start = max(0, min(start, n - block))
        sl = slice(start, start + block)
        got = codes[..., sl] if channel_first else codes[:, sl]
        idx = indices[..., sl] if channel_first else indices[:, sl]
        with torch.no_grad():
            expected = ref.indices_to_codes(idx.contiguous())
        assert_bitwise_equal(got, expected, f"decoded codes at token {start}")
    del codes
    # the backward over the whole tensor
    zg = z.requires_grad_(True)
    out, _ = ours(zg)
    grad_out = torch.ones_like(out)
    out.backward(grad_out)
    del out, grad_out
    for start in samples:
        start = max(0, min(start, n - block))
        sl = slice(start, start + block)
        zs = (z[..., sl] if channel_first else z[:, sl]).detach().clone().requires_grad_(True)
        ref_out, _ = ref(zs)
        ref_out.backward(torch.ones_like(ref_out))
        got = z.grad[..., sl] if channel_first else z.grad[:, sl]
        torch.testing.assert_close(got, zs.grad, rtol=0, atol=1e-5, msg=f"grad at token {start}")


def huge_samples(n, d, channel_first, block):
    """Token positions to check: start, middle, end, and where element offsets cross 2**31."""
    if channel_first:  # offset = channel * n + token: each channel but the first crosses somewhere
        crossings = [2**31 - c * n for c in range(d) if 0 <= 2**31 - c * n < n]
    else:  # offset = token * d + channel
        crossings = [2**31 // d]
    return sorted({0, n // 2, n - block, *[max(0, t - block // 2) for t in crossings]})


# --------------------------------------------------------------------------------------------------
# The GPU tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_gpu
def test_video_latent_bitwise():
    """32x6x32x128x128 float32 (100M values, 16.8M tokens), levels [8,8,8,5,5,5]: bit for bit, as docs/semantics.md requires."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(32, 6, 32, 128, 128, device="cuda", generator=gen)
    check_forward_parity([8, 8, 8, 5, 5, 5], z)
    z.mul_(3)  # more saturation
    check_forward_parity([8, 8, 8, 5, 5, 5], z)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("levels", LEVEL_SETS, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["channel-first", "channel-last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_planted_thresholds_bitwise(levels, channels_last, dtype):
    gen = torch.Generator().manual_seed(sum(levels))
    tokens = max(8192, 16 * max(levels))
    z = planted_input(levels, "cuda", tokens, dtype, channels_last, gen)
    check_forward_parity(levels, z)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 6, 5]], ids=["8555", "765"])
@pytest.mark.parametrize("num_codebooks", [1, 2])
@pytest.mark.parametrize("shape_kind", ["seq", "image", "video"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_shapes_and_codebooks_bitwise(levels, num_codebooks, shape_kind, dtype):
    e = len(levels) * num_codebooks
    shape = {"seq": (16, 4099, e), "image": (8, e, 67, 65), "video": (4, e, 5, 33, 31)}[shape_kind]
    gen = torch.Generator(device="cuda").manual_seed(1)
    z = (torch.randn(shape, device="cuda", generator=gen) * 2).to(dtype)
    z.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], device="cuda").to(dtype)
    indices = check_forward_parity(levels, z, num_codebooks=num_codebooks)
    assert (indices.view(-1)[0] == -1).item()
    if shape_kind == "seq":  # a strided channel-last view
        check_forward_parity(levels, z[:, ::3], num_codebooks=num_codebooks)
    else:
        check_forward_parity(levels, z.contiguous(memory_format=torch.channels_last if z.ndim == 4 else torch.channels_last_3d),
                             num_codebooks=num_codebooks)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize(
    "levels,kwargs,shape",
    [
        ([8, 8, 8, 5, 5, 5], {}, (4, 6, 8, 64, 64)),
        ([8, 5, 5, 5], {"num_codebooks": 2}, (16, 2048, 8)),
        ([7, 6, 5], {}, (8, 3, 96, 96)),
        ([8, 6, 5], {"dim": 256}, (8, 1024, 256)),
        ([8, 5, 5, 5], {"dim": 64, "num_codebooks": 2}, (4, 64, 32, 32)),
    ],
    ids=["video", "seq-c2", "image-765", "seq-projection", "image-projection-c2"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gradient_matches_torch_backend(levels, kwargs, shape, dtype):
    gen = torch.Generator(device="cuda").manual_seed(2)
    z = (torch.randn(shape, device="cuda", generator=gen) * 2).to(dtype)
    grad_out = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    if "dim" in kwargs and dtype != torch.float32:
        pytest.skip("float32 projection weights: the bfloat16 input is cast to them (covered by the float32 case)")
    check_gradient(levels, z, grad_out, **kwargs)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("levels", LEVEL_SETS, ids=IDS)
@pytest.mark.parametrize("shape_kind", ["seq", "image", "seq-c2", "image-projection"])
def test_decode_matches_torch_backend(levels, shape_kind):
    kwargs = {"seq-c2": {"num_codebooks": 2}, "image-projection": {"dim": 32}}.get(shape_kind, {})
    size = 1
    for level in levels:
        size *= level
    gen = torch.Generator(device="cuda").manual_seed(3)
    token_shape = {"seq": (8, 5000), "image": (4, 70, 66), "seq-c2": (8, 3000, 2), "image-projection": (4, 40, 33)}[shape_kind]
    indices = torch.randint(0, size, token_shape, device="cuda", generator=gen)
    indices.view(-1)[:2] = torch.tensor([0, size - 1], device="cuda")
    check_decode(levels, indices, **kwargs)
    check_decode(levels, indices.to(torch.int32), **kwargs)


@pytest.mark.gpu
@requires_gpu
def test_decode_out_of_range_is_nan_on_cuda():
    """On CUDA the range check would cost a sync: an index outside [0, codebook_size) decodes to NaN."""
    ours, ref = pair([8, 5, 5, 5], "cuda")
    indices = torch.tensor([[0, -1, 1000, 999, 5]], device="cuda")
    codes = ours.indices_to_codes(indices)
    assert codes[0, 1].isnan().all() and codes[0, 2].isnan().all()
    assert not codes[0, [0, 3, 4]].isnan().any()
    assert_bitwise_equal(codes, ref.indices_to_codes(indices), "codes")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("channel_first", [True, False], ids=["channel-first", "channel-last"])
def test_more_than_2_31_elements(channel_first):
    """(1, 5, 1, n) or (1, n, 5) float32 with 5n > 2**31: z, out, indices, codes and grads ~ 40 GB at peak."""
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs about 45 GB of GPU memory")
    levels = [8, 5, 5, 5, 5]
    n = 2**31 // 5 + 1024
    shape = (1, 5, 1, n) if channel_first else (1, n, 5)
    block = 4096
    samples = huge_samples(n, 5, channel_first, block)
    check_huge(levels, shape, channel_first, samples, "cuda", block)


# --------------------------------------------------------------------------------------------------
# The same checks on small CPU tensors (interpreter): they keep the helpers above honest without a GPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not interpreting(), reason="runs the GPU checks on CPU tensors under the interpreter")
def test_gpu_checks_on_cpu():
    gen = torch.Generator().manual_seed(0)
    for levels in ([8, 5, 5, 5], [7, 6, 5], [26, 27, 38]):
        for channels_last in (False, True):
            for dtype in (torch.float32, torch.float16):
                tokens = max(256, 16 * max(levels))
                check_forward_parity(levels, planted_input(levels, "cpu", tokens, dtype, channels_last, gen))
    z = torch.randn(2, 6, 3, 8, 8, generator=gen) * 2
    check_forward_parity([8, 8, 8, 5, 5, 5], z)
    check_gradient([8, 5, 5, 5], torch.randn(3, 50, 8, generator=gen), torch.randn(3, 50, 8, generator=gen), num_codebooks=2)
    check_decode([8, 5, 5, 5], torch.randint(0, 1000, (2, 7, 9), generator=gen))
    check_decode([8, 5, 5, 5], torch.randint(0, 1000, (2, 30, 2), generator=gen), num_codebooks=2)
    # the huge-input check on a small tensor: samples at both ends and in the middle
    n = 700
    for channel_first in (True, False):
        shape = (1, 5, 1, n) if channel_first else (1, n, 5)
        samples = huge_samples(n, 5, channel_first, 64)
        assert 0 in samples and n - 64 in samples
        check_huge([8, 5, 5, 5, 5], shape, channel_first, samples, "cpu", 64)


def test_flips_are_allowed_only_at_ties_on_cpu():
    """The tie-breaking rule of :func:`flips_at_ties` (used by the GPU gradient tests), checked on the CPU."""
    levels = [8, 5, 5]
    ours, _ = pair(levels, "cpu", dim=16)
    with torch.no_grad():
        ours.project_in.weight.zero_()
        ours.project_in.weight[0, 0] = 1.0
        ours.project_in.bias.zero_()
    z = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(0)) * 0.01
    z[0, 3, 0] = level_tables(tuple(levels), "cpu").thresholds[0, 2]   # h_0 of token (0, 3) sits on a threshold
    indices = ours(z)[1]
    assert not flips_at_ties(ours, z, indices, indices.clone()).any()
    flipped = indices.clone()
    flipped[0, 3] += 1                                          # a flip at the tie: allowed, and reported
    assert flips_at_ties(ours, z, indices, flipped, max_fraction=0.1).sum() == 1
    flipped[1, 5] += 1                                          # a flip where every channel is far from a threshold
    with pytest.raises(AssertionError, match="1 index flips away from any threshold tie"):
        flips_at_ties(ours, z, indices, flipped, max_fraction=0.1)
    flipped[1, 5] -= 1                                          # only the tie again, but 1 of 20 tokens is too many
    with pytest.raises(AssertionError, match="of the tokens flipped at ties"):
        flips_at_ties(ours, z, indices, flipped, max_fraction=0.01)


def check_residual_soft_clamp(device, tokens: int) -> None:
    """ResidualFSQ with vqp's default soft clamp (8 stages of [8, 5, 5, 5]) on ``device``: where the module's check
    finds the kernels' tanh and soft clamp equal to torch's there (expected on the GPU machines: the same tanhf), the
    default runs the soft clamp in the kernel; either way its indices, quantized output and input gradient equal
    those of vqp's op sequence on the same device (``backend="torch"``), bit for bit."""
    from fsq_triton import ResidualFSQ
    from fsq_triton.ops import residual as residual_ops

    probe = {} if torch.device(device).type == "cuda" else {"stride": (1 << 22) + 1, "window": 8}
    tanh_differs = residual_ops.tanh_mismatches(device, **probe)
    ours = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=8).to(device)
    reference = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=8, backend="torch").to(device)
    in_kernel = ours._soft_clamp_runs_in_kernel(torch.device(device))
    assert in_kernel == (tanh_differs == 0 and all(
        residual_ops.soft_clamp_mismatches(device, c, residual_ops.SOFT_DIVIDE, **probe) == 0
        for c in set(ours._soft_clamp_key))), tanh_differs
    x = torch.randn(2, tokens, 4, generator=torch.Generator().manual_seed(3)).mul(1.5).to(device)
    xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    qo, io = ours(xo)
    qr, ir = reference(xr)
    assert torch.equal(io, ir), (in_kernel, int((io != ir).sum()))
    assert_bitwise_equal(qo, qr, f"soft clamp in the kernel: {in_kernel}")
    g = torch.randn_like(qo)
    qo.backward(g)
    qr.backward(g)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@requires_gpu
def test_residual_soft_clamp_in_the_kernel_matches_vqps_ops():
    check_residual_soft_clamp("cuda", 1 << 20)


@pytest.mark.skipif(not interpreting(), reason="runs the GPU check on CPU tensors under the interpreter")
def test_residual_soft_clamp_check_on_cpu():
    check_residual_soft_clamp("cpu", 64)

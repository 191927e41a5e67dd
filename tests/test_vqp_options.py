"""``fsq_triton.FSQ`` with vector-quantize-pytorch 1.32's FSQ options: parity with vqp on both backends.

Oracle: ``tests/data/fsq_vqp132_golden.pt``, written by vqp 1.32 itself (``scripts/make_fsq_vqp_golden.py``), so
CI needs no vqp. The "triton" backend runs the fused kernels under Triton's CPU interpreter (tiny shapes). Every
bound (``preserve_symmetry`` x ``bound_hard_clamp``) is a calibration of the same level tables feeding the same
kernels; the tests check each against vqp's outputs, indices, gradients and decodes, and the tables themselves
against the bound's own torch ops.
"""

from pathlib import Path

import pytest
import torch

from conftest import interpreting, run_gloo_workers

from fsq_triton import FSQ
from fsq_triton.levels import BOUNDS, bound_kind, bound_level, level_tables

GOLDEN = Path(__file__).parent / "data" / "fsq_vqp132_golden.pt"


def load_golden():
    return torch.load(GOLDEN, weights_only=True)


CASES = {case["name"]: case for case in load_golden()["cases"]}


def kwargs_of(case):
    return eval(case["kwargs"], {"torch": torch})  # a literal written by the golden script (dtypes in it)


def build(case, backend):
    module = FSQ(**kwargs_of(case), backend=backend)
    module.load_state_dict(case["state_dict"], strict=True)
    return module.train(case["train"])


def test_golden_file_comes_from_vqp_1_32():
    golden = load_golden()
    assert golden["vqp_version"].startswith("1.32.")
    names = set(CASES)
    assert {"default", "hard_clamp", "symmetric", "symmetric_hard_clamp", "channel_first", "no_indices", "rotation",
            "projections_no_bias", "noise_dropout_eval"} <= names


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_with_vqp(name, backend):
    case = CASES[name]
    module = build(case, backend)
    # the fused projection kernels sum the matmuls in their own order: ulps, not bits (the indices still agree)
    exact = not module.has_projections or backend == "torch"
    x = case["x"].clone().requires_grad_(True)
    out, indices = module(x)

    assert out.shape == case["out"].shape and out.dtype == case["out"].dtype
    if exact:
        assert torch.equal(out, case["out"]), f"{name}: out differs from vqp"
    else:
        torch.testing.assert_close(out, case["out"], rtol=1e-5, atol=1e-5)
    if case["indices"] is None:
        assert indices is None
        assert not hasattr(module, "implicit_codebook")  # vqp builds none without indices
    else:
        assert indices.dtype == torch.int32 and torch.equal(indices, case["indices"]), f"{name}: indices differ"
        # with keep_num_codebooks_dim the reference's buffer is flat (kept); vqp 1.32's is (codebook_size, d)
        assert torch.equal(module.implicit_codebook.reshape(case["implicit_codebook"].shape), case["implicit_codebook"])

    out.backward(case["grad_out"])
    torch.testing.assert_close(x.grad, case["grad_x"], rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert grads.keys() == case["param_grads"].keys()
    for n, grad in grads.items():
        torch.testing.assert_close(grad, case["param_grads"][n], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} {n}: {m}")

    with torch.no_grad():
        if case["indices"] is not None:
            decoded = module.indices_to_codes(case["indices"])
            assert decoded.shape == case["decoded"].shape
            torch.testing.assert_close(decoded, case["decoded"], rtol=1e-5 if not exact else 0, atol=1e-5 if not exact else 0)
        codes = module.quantize(case["codes_in"])
        assert torch.equal(codes, case["codes"]), f"{name}: quantize differs from vqp"
        assert torch.equal(module.codes_to_indices(codes), case["codes_to_indices"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_loads_both_ways(name):
    case = CASES[name]
    ours = FSQ(**kwargs_of(case), backend="torch")
    assert ours.state_dict().keys() == case["state_dict"].keys()
    ours.load_state_dict(case["state_dict"], strict=True)
    fresh = FSQ(**kwargs_of(case), backend="torch")
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for key, value in case["state_dict"].items():
        assert torch.equal(fresh.state_dict()[key], value)
    if "orthogonal_rotation=True" in case["kwargs"]:
        assert "orthogonal_rot" in ours.state_dict()


# --------------------------------------------------------------------------------------------------
# One calibration, every bound
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [(8, 7, 5, 3), (12, 13, 14)])
@pytest.mark.parametrize("bound", BOUNDS)
def test_tables_reproduce_each_bound(bound, levels):
    """Thresholds against the bound's ops with its constants computed on the (d,) levels tensor, as the reference and
    vqp compute them (levels 12: atanh over a longer tensor would differ by an ulp on the CPU, moving thresholds)."""
    levels = tuple(2 if bound.startswith("sym") and lv == 3 else lv for lv in levels)
    tables = level_tables(levels, "cpu", bound)
    lv = torch.tensor(levels, dtype=torch.int32)
    z = torch.cat([torch.linspace(-4, 4, 20001), tables.thresholds[tables.thresholds.isfinite()],
                   torch.tensor([-1.0, 1.0, 0.0, -0.0, float("inf"), float("-inf")])])
    z = torch.cat([z, z.nextafter(torch.tensor(float("inf"))), z.nextafter(torch.tensor(float("-inf")))])[:, None]
    counted = (z[:, :, None] >= tables.thresholds).sum(-1)        # (z, d): thresholds at or below z
    assert torch.equal(counted.float(), bound_level(z.expand(-1, len(levels)), bound, lv))
    # every bound has the same table shape: the forward kernel is one specialisation for all of them
    assert tables.values.shape == level_tables(levels, "cpu", "tanh_shift").values.shape
    assert tables.bound == bound


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("layout", ["sequence", "channel_first", "image"])
def test_kernels_match_the_torch_path(bound, layout):
    if not interpreting():
        pytest.skip("the kernels on CPU tensors need TRITON_INTERPRET=1")
    levels = [7, 5, 2] if bound.startswith("sym") else [7, 5, 4]
    kwargs = dict(levels=levels, num_codebooks=2, preserve_symmetry=bound.startswith("sym"),
                  bound_hard_clamp="clamp" in bound, channel_first=layout == "channel_first")
    shape = {"sequence": (2, 13, 6), "channel_first": (2, 6, 13), "image": (2, 6, 3, 5)}[layout]
    torch.manual_seed(3)
    z = torch.randn(shape) * 1.5
    z.view(-1)[:4] = torch.tensor([1.0, -1.0, 0.0, float("nan")])
    results = []
    for backend in ("torch", "triton"):
        zz = z.clone().requires_grad_(True)
        out, indices = FSQ(**kwargs, backend=backend)(zz)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        (out.nan_to_num() * g).sum().backward()
        results.append((out, indices, zz.grad))
    (o1, i1, g1), (o2, i2, g2) = results
    assert torch.equal(o1.nan_to_num(7.0), o2.nan_to_num(7.0)) and torch.equal(i1, i2)
    torch.testing.assert_close(g2, g1, rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("bound", ["clamp_shift", "sym_clamp"])
def test_hard_clamp_gradient_is_zero_outside_the_clamp(bound, backend):
    levels = [8, 5, 3] if bound == "clamp_shift" else [8, 5, 2]
    fsq = FSQ(levels, preserve_symmetry=bound == "sym_clamp", bound_hard_clamp=True, backend=backend)
    tables = level_tables(tuple(levels), "cpu", bound)
    lo, hi = tables.clamp_lo, tables.clamp_hi                    # -1 <= z + shift <= 1  <=>  lo <= z < hi
    inf = torch.tensor(float("inf"))
    z = torch.stack([lo, lo.nextafter(-inf), hi, hi.nextafter(-inf), lo - 3, hi + 3, (lo + hi) / 2], dim=0)[None]
    z.requires_grad_(True)
    out, _ = fsq(z)
    out.sum().backward()
    passes = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0])[:, None].expand(-1, 3)
    assert torch.equal(z.grad[0] != 0, passes != 0)
    torch.testing.assert_close(z.grad[0][passes != 0], tables.grad_scale.expand(7, 3)[passes != 0])


# --------------------------------------------------------------------------------------------------
# Options without a golden counterpart: huge codebooks without indices, level indices, channel-first decode
# --------------------------------------------------------------------------------------------------


def test_return_indices_false_allows_codebooks_past_int32(backend):
    levels = [256, 256, 256, 256]  # 2**32 codes: no int32 index could name them
    with pytest.raises(ValueError, match="exceeds the int32 range"):
        FSQ(levels)
    fsq = FSQ(levels, return_indices=False, backend=backend)
    z = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0))
    out, indices = fsq(z)
    assert indices is None
    expected, _ = FSQ(levels, return_indices=False, backend="torch")(z)
    assert torch.equal(out, expected)
    assert not hasattr(fsq, "implicit_codebook")  # vqp builds none without indices either


def test_indices_to_level_indices():
    fsq = FSQ([8, 5, 3], num_codebooks=2)
    indices = torch.randint(0, 120, (2, 7, 2))
    level_indices = fsq.indices_to_level_indices(indices)
    assert level_indices.shape == (2, 7, 2, 3)
    assert torch.equal((level_indices * torch.tensor([1, 8, 40])).sum(-1), indices)
    assert (level_indices < torch.tensor([8, 5, 3])).all()
    with pytest.raises(TypeError, match="integer tensor"):
        fsq.indices_to_level_indices(torch.zeros(3))


@pytest.mark.parametrize("project_out", [True, False])
def test_channel_first_indices_to_codes(project_out, backend):
    fsq = FSQ([8, 5, 3], dim=5, channel_first=True, backend=backend)
    z = torch.randn(2, 5, 9)
    out, indices = fsq(z)
    assert indices.shape == (2, 9)
    codes = fsq.indices_to_codes(indices, project_out=project_out)
    assert codes.shape == ((2, 5, 9) if project_out else (2, 3, 9))
    if project_out:
        torch.testing.assert_close(codes, out, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# noise_dropout: vqp's in eval mode (golden), its properties in training
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.25, 1.0])
def test_noise_dropout_in_training(p, backend):
    levels = [7, 5, 4]
    fsq = FSQ(levels, preserve_symmetry=True, noise_dropout=p, backend=backend)
    z = torch.randn(4, 200, 3, generator=torch.Generator().manual_seed(1))
    clean, clean_indices = fsq.eval()(z)
    fsq.train()
    torch.manual_seed(11)
    noisy, noisy_indices = fsq(z)
    torch.manual_seed(11)
    again, _ = fsq(z)
    assert torch.equal(noisy, again), "not reproducible under torch.manual_seed"
    assert torch.equal(noisy_indices, clean_indices), "indices must come from the codes before the noise"
    diff = noisy - clean
    assert diff.abs().max() <= 0.5 and noisy.abs().max() <= 1.0
    changed = (diff != 0).float().mean().item()
    # an element with noise is unchanged only where the clamp undoes it (at the extreme codes, about half the time)
    assert 0.5 * p <= changed <= p + 0.02, changed


def test_noise_dropout_off_in_eval_and_at_zero(backend):
    z = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(2))
    noisy = FSQ([7, 5, 3], preserve_symmetry=True, noise_dropout=0.5, backend=backend)
    plain = FSQ([7, 5, 3], preserve_symmetry=True, backend=backend)
    assert torch.equal(noisy.eval()(z)[0], plain(z)[0])
    assert torch.equal(FSQ([7, 5, 3], preserve_symmetry=True, noise_dropout=0.0, backend=backend).train()(z)[0], plain(z)[0])


# --------------------------------------------------------------------------------------------------
# Conflicting or bad options: ValueError / TypeError naming the problem (vqp asserts)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(levels=[8, 5], noise_dropout=0.1), ValueError, "noise_dropout=0.1 needs preserve_symmetry=True"),
        (dict(levels=[8, 5], preserve_symmetry=True, noise_dropout=1.5), ValueError, r"noise_dropout must be a probability in \[0, 1\]"),
        (dict(levels=[8, 5], preserve_symmetry=True, noise_dropout=-0.1), ValueError, "noise_dropout must be a probability"),
        (dict(levels=[8, 5], allowed_dtypes=torch.float32), TypeError, "allowed_dtypes must be a tuple of torch dtypes"),
        (dict(levels=[8, 5], allowed_dtypes=("float32",)), TypeError, "allowed_dtypes must be a tuple of torch dtypes"),
        (dict(levels=[8, 5], channel_first=1), TypeError, "channel_first must be a bool"),
        (dict(levels=[8, 5], preserve_symmetry="yes"), TypeError, "preserve_symmetry must be a bool"),
        (dict(levels=[8, 5], return_indices=None), TypeError, "return_indices must be a bool"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        FSQ(**kwargs)


def test_options_are_stored_as_vqp_names_them():
    fsq = FSQ([8, 5, 2], allowed_dtypes=(torch.float32,), channel_first=True, force_quantization_f32=False,
              preserve_symmetry=True, noise_dropout=0.25, bound_hard_clamp=True, orthogonal_rotation=True)
    assert fsq.allowed_dtypes == (torch.float32,) and fsq.channel_first and not fsq.force_quantization_f32
    assert fsq.preserve_symmetry and fsq.noise_dropout == 0.25 and fsq.bound_hard_clamp and fsq.orthogonal_rotation
    assert fsq.return_indices and fsq.bound_kind == "sym_clamp" == bound_kind(True, True)
    assert fsq.orthogonal_rot.shape == (3, 3)
    torch.testing.assert_close(fsq.orthogonal_rot @ fsq.orthogonal_rot.T, torch.eye(3), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# track_usage: per-code counts on the device, fraction used, perplexity, reset, DDP all-reduce
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projections", [False, True])
def test_track_usage_counts_every_code(projections, backend):
    levels, c = [5, 4, 3], 2
    fsq = FSQ(levels, dim=7 if projections else None, num_codebooks=c, track_usage=True, backend=backend)
    counts = torch.zeros(c, 60, dtype=torch.int64)
    for seed in range(3):
        z = torch.randn(2, 9, fsq.dim, generator=torch.Generator().manual_seed(seed))
        if seed == 2:
            z[0, 0, 0] = float("nan")  # a NaN token (index -1) counts nowhere
        _, indices = fsq(z)
        for k in range(c):
            valid = indices[..., k][indices[..., k] >= 0]
            counts[k] += torch.bincount(valid.long(), minlength=60)
    usage = fsq.codebook_usage()
    assert torch.equal(usage["counts"], counts)
    nan_indices = c if projections else 1  # project_in spreads the NaN over both codebooks
    assert usage["counts"].sum() == 3 * 2 * 9 * c - nan_indices
    torch.testing.assert_close(usage["used_fraction"], ((counts > 0).sum(-1) / 60).float())
    p = counts.double() / counts.sum(-1, keepdim=True)
    expected = torch.exp(-(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)).float()
    torch.testing.assert_close(usage["perplexity"], expected)
    fsq.reset_usage()
    usage = fsq.codebook_usage()
    assert usage["counts"].sum() == 0 and (usage["perplexity"] == 0).all() and (usage["used_fraction"] == 0).all()


def test_track_usage_bad_use():
    with pytest.raises(ValueError, match="past the limit of 2\\*\\*20"):
        FSQ([32, 32, 32, 33], track_usage=True)
    FSQ([32, 32, 32, 32], track_usage=True, backend="torch")  # exactly 2**20 codes is allowed
    assert FSQ([8, 5], return_indices=False, track_usage=True).track_usage  # counted without returning indices
    with pytest.raises(RuntimeError, match="track_usage=True"):
        FSQ([8, 5]).codebook_usage()
    assert "usage_counts" not in FSQ([8, 5], track_usage=True).state_dict()  # vqp's state_dict loads strictly


def test_track_usage_under_torch_compile():
    fsq = FSQ([5, 4, 3], track_usage=True, backend="torch")
    compiled = torch.compile(fsq, backend="aot_eager", fullgraph=True)
    z = torch.randn(2, 9, 3)
    _, indices = compiled(z)
    assert torch.equal(fsq.codebook_usage()["counts"][0], torch.bincount(indices.flatten().long(), minlength=60))


def _usage_worker(rank, world_size, port, out_dir):
    import json
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=timedelta(seconds=60))
    fsq = FSQ([5, 4, 3], track_usage=True, backend="torch")
    fsq(torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(rank)))
    local = fsq.usage_counts.clone()
    total = fsq.codebook_usage(all_reduce=True)["counts"]
    assert torch.equal(fsq.usage_counts, local)  # the local counts are left as they were
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"local": local.tolist(), "total": total.tolist()}))


def test_track_usage_all_reduce_across_ranks():
    results = run_gloo_workers(_usage_worker)
    local = [torch.tensor(r["local"]) for r in results]
    for r in results:
        assert torch.equal(torch.tensor(r["total"]), local[0] + local[1])
    assert local[0].sum() == local[1].sum() == 6


def test_no_bias_projections_launch_without_a_bias(backend):
    """projection_has_bias=False: the fused ops get empty biases (the kernels drop the term, read nothing) and give
    what nn.Linear without bias gives."""
    fsq = FSQ([8, 5, 3], dim=6, projection_has_bias=False, backend=backend)
    assert fsq.project_in.bias is None and fsq.project_out.bias is None
    w_in, b_in, w_out, b_out = fsq._projection_params()
    assert b_in.numel() == 0 and b_out.numel() == 0
    x = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(4))
    out, indices = fsq(x)
    h = x @ fsq.project_in.weight.T
    codes, expected_indices = FSQ([8, 5, 3], backend="torch")(h)
    torch.testing.assert_close(out, codes @ fsq.project_out.weight.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, expected_indices)
    decoded = fsq.indices_to_codes(indices)
    torch.testing.assert_close(decoded, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bound", BOUNDS)
def test_torch_compile_keeps_the_bound(bound):
    """Compiled (Inductor), the ops' traced CPU body counts the calibrated thresholds of the module's own bound (it
    reads no bound from the tables, which are fake while tracing). Inductor's on-disk caches are off: their key does
    not cover the ops' bodies, so a graph compiled by an older fsq_triton could be replayed."""
    levels = [8, 5, 2] if bound.startswith("sym") else [8, 5, 3]
    kwargs = dict(levels=levels, preserve_symmetry=bound.startswith("sym"), bound_hard_clamp="clamp" in bound)
    z = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(6)) * 2
    expected, expected_indices = FSQ(**kwargs, backend="torch")(z)
    torch.compiler.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        out, indices = torch.compile(FSQ(**kwargs), fullgraph=True)(z)
    assert torch.equal(out, expected) and torch.equal(indices, expected_indices)

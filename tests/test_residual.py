"""ResidualFSQ and GroupedResidualFSQ: parity with vector-quantize-pytorch on both backends and both semantics.

Oracles: the golden files of vqp 1.32 (default semantics) and vqp 1.25.2 (``semantics="pre-1.26"``), written by
``scripts/make_residual_golden.py``, and vqp 1.32 itself where it is installed (CI). The "triton" backend runs the
fused kernels under Triton's CPU interpreter. Shapes stay tiny (interpreter).
"""

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import interpreting, run_gloo_workers

import fsq_triton
from fsq_triton import GroupedResidualFSQ, ResidualFSQ
from fsq_triton.module import BackendUnavailableError
from fsq_triton.residual_levels import residual_tables, stage_level

DATA = Path(__file__).parent / "data"
GOLDEN = {
    "current": DATA / "residual_golden_v1_32.pt",
    "pre-1.26": DATA / "residual_golden_v1_25_2.pt",
}


def load_golden(semantics):
    return torch.load(GOLDEN[semantics], weights_only=True)


GOLDEN_CASES = [(sem, case["name"]) for sem in GOLDEN for case in load_golden(sem)["cases"]]


def build(module_kind, kwargs, semantics, backend):
    extra = {} if semantics == "current" else {"semantics": "pre-1.26"}
    if module_kind == "r":
        return ResidualFSQ(**kwargs, **extra, backend=backend)
    return GroupedResidualFSQ(**kwargs, **extra, backend=backend)


def float_close(actual, expected, what, rtol=1e-6, atol=1e-6):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------
# Golden files (vqp 1.32 and vqp 1.25.2)
# --------------------------------------------------------------------------------------------------


def test_golden_files_come_from_the_two_versions():
    assert load_golden("current")["vqp_version"] == "1.32.0"
    assert load_golden("pre-1.26")["vqp_version"] == "1.25.2"
    for semantics in GOLDEN:
        names = {case["name"] for case in load_golden(semantics)["cases"]}
        assert {"plain", "eight_stages", "projections", "channel_first", "dropout", "grouped", "grouped_projections"} <= names


@pytest.mark.parametrize("semantics,name", GOLDEN_CASES)
def test_golden(semantics, name, backend):
    case = next(c for c in load_golden(semantics)["cases"] if c["name"] == name)
    kwargs = json.loads(case["kwargs"])
    module = build(case["module"], kwargs, semantics, backend)
    module.load_state_dict(case["state_dict"], strict=True)
    module.train(case["train"])
    x = case["x"].clone().requires_grad_(True)
    call = {"return_all_codes": True}
    if case["module"] == "r" and case["seed"] is not None:
        call["rand_quantize_dropout_fixed_seed"] = case["seed"]
    if case["module"] == "g" and case["seed"] is not None:
        torch.manual_seed(case["seed"])
    quantized, indices, all_codes = module(x, **call)

    assert indices.dtype == case["indices"].dtype and torch.equal(indices, case["indices"]), f"{name}: indices differ"
    float_close(quantized, case["quantized"], f"{name} quantized")
    quantized.backward(case["grad_out"])
    float_close(x.grad, case["grad_x"], f"{name} grad of x", rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert grads.keys() == case["param_grads"].keys()
    for n, expected in case["param_grads"].items():
        float_close(grads[n], expected, f"{name} grad of {n}", rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        decoded = module.get_output_from_indices(indices)
        codes = module.get_codes_from_indices(indices)
    if case["decode_error"]:
        # vqp's own decode fails on channel-first indices (it reads their last axis as the stages): ours works, and
        # agrees with the forward pass it inverts
        assert case["all_codes_error"] and case["all_codes"] is None
        float_close(decoded, quantized.detach(), f"{name} decode of channel-first indices (vqp fails here)")
        summed = codes.sum(0) if case["module"] == "r" else torch.stack([c.sum(0) for c in codes])
        assert summed.shape[-1] == len(kwargs["levels"])
    else:
        float_close(decoded, case["decoded"], f"{name} get_output_from_indices")
        float_close(codes, case["codes_from_indices"], f"{name} get_codes_from_indices")
        if case["module"] == "r":
            float_close(all_codes, case["all_codes"], f"{name} all_codes")
        else:
            for got, expected in zip(all_codes, case["all_codes"]):
                float_close(got, expected, f"{name} all_codes")


# --------------------------------------------------------------------------------------------------
# vqp 1.32 itself, on random inputs
# --------------------------------------------------------------------------------------------------

try:
    import vector_quantize_pytorch as vqp
except ImportError:  # the golden-file tests above still run
    vqp = None
needs_vqp = pytest.mark.skipif(vqp is None, reason="needs vector-quantize-pytorch (the live oracle; CI installs 1.32)")

RANDOM_CONFIGS = [
    dict(levels=[8, 5, 5, 5], num_quantizers=8),
    dict(levels=[7, 5, 3], num_quantizers=4, bound_hard_clamp=False),
    dict(levels=[4, 4, 6], num_quantizers=3, bound_hard_clamp=False, soft_clamp_input_value=[1.3, 0.9, 2.0]),
    dict(levels=[2, 3, 16], num_quantizers=5),
    dict(levels=[40, 3], num_quantizers=2),  # past 32 levels the kernel loops over the thresholds instead of unrolling
    dict(levels=[8, 5, 5, 5], num_quantizers=3, dim=10),
]


@needs_vqp
@pytest.mark.parametrize("config", RANDOM_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace(" ", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_inputs_match_vqp(config, dtype, backend):
    torch.manual_seed(hash(str(config)) % 1000)
    reference = vqp.ResidualFSQ(**config)
    ours = ResidualFSQ(**config, backend=backend)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(3, 40, config.get("dim", len(config["levels"]))) * 2
    # half precision: the input itself, or (with projections, whose float32 weights vqp cannot mix with a bf16
    # input) bf16 projections under autocast
    autocast = "dim" in config and dtype == torch.bfloat16
    if not autocast:
        x = x.to(dtype)
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        qr, ir, cr = reference(xr, return_all_codes=True)
        qo, io, co = ours(xo, return_all_codes=True)
    assert io.dtype == ir.dtype and torch.equal(io, ir)
    float_close(qo, qr, "quantized")
    float_close(co, cr, "all codes")
    grad = torch.randn_like(qr)
    qr.backward(grad)
    qo.backward(grad)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    float_close(xo.grad, xr.grad, "grad of x", **tol)
    for (n, p), (_, pr) in zip(ours.named_parameters(), reference.named_parameters()):
        float_close(p.grad, pr.grad, f"grad of {n}", **tol)
    float_close(ours.get_output_from_indices(io), reference.get_output_from_indices(ir), "decode")


@needs_vqp
def test_many_stage_thresholds_match_vqp_on_dense_inputs(backend):
    """A dense sweep through the deepest stage's bins: every index equal to vqp's."""
    config = dict(levels=[8, 5, 5, 5], num_quantizers=8)
    reference, ours = vqp.ResidualFSQ(**config), ResidualFSQ(**config, backend=backend)
    x = torch.linspace(-1.3, 1.3, 4 * 1024).reshape(4, 256, 4)
    with torch.no_grad():
        qr, ir = reference(x)
        qo, io = ours(x)
    assert torch.equal(io, ir)
    assert torch.equal(qo, qr)


@needs_vqp
@pytest.mark.parametrize("accept_image_fmap", [False, True])
def test_grouped_random_inputs_match_vqp(accept_image_fmap, backend):
    kwargs = dict(dim=12, groups=3, levels=[5, 5, 5], num_quantizers=3, accept_image_fmap=accept_image_fmap)
    if accept_image_fmap:
        kwargs["is_channel_first"] = True
    torch.manual_seed(5)
    reference = vqp.GroupedResidualFSQ(**kwargs)
    ours = GroupedResidualFSQ(**kwargs, backend=backend)
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 12, 3, 5) if accept_image_fmap else torch.randn(2, 15, 12)
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    qr, ir = reference(xr)
    qo, io = ours(xo)
    assert torch.equal(io, ir)
    float_close(qo, qr, "quantized")
    grad = torch.randn_like(qr)
    qr.backward(grad)
    qo.backward(grad)
    float_close(xo.grad, xr.grad, "grad of x", rtol=1e-5, atol=1e-5)
    for (n, p), (_, pr) in zip(ours.named_parameters(), reference.named_parameters()):
        float_close(p.grad, pr.grad, f"grad of {n}", rtol=1e-5, atol=1e-5)


@needs_vqp
def test_state_dict_loads_strictly_both_ways():
    for kwargs in (dict(levels=[8, 5, 5, 5], num_quantizers=2, dim=16), dict(levels=[5, 5], num_quantizers=2)):
        reference, ours = vqp.ResidualFSQ(**kwargs), ResidualFSQ(**kwargs)
        ours.load_state_dict(reference.state_dict(), strict=True)
        reference.load_state_dict(ours.state_dict(), strict=True)
        assert ours.state_dict().keys() == reference.state_dict().keys()
        assert torch.equal(ours.scales, reference.scales)
        assert torch.equal(ours.codebooks, reference.codebooks)
        assert torch.equal(ours.soft_clamp_input_value, reference.soft_clamp_input_value)
        assert ours.codebook_size == reference.codebook_size


def test_pre_1_26_constants_are_vqp_1_25_2s():
    """The old scales (L - 1) ** -s and the tanh bound's codebook ((level - L // 2) / (L // 2), asymmetric for even L)."""
    case = next(c for c in load_golden("pre-1.26")["cases"] if c["name"] == "plain")
    ours = ResidualFSQ(**json.loads(case["kwargs"]), semantics="pre-1.26")
    expected = torch.stack([(torch.Tensor([8, 5, 5, 5]) - 1) ** -s for s in range(4)])
    assert torch.equal(ours.scales, expected)
    assert ours.codebooks.shape == (4, 1000, 4)
    assert ours.codebooks[0, 0].tolist() == [-1.0, -1.0, -1.0, -1.0]
    assert ours.codebooks[3, 999].tolist() == [0.75, 1.0, 1.0, 1.0]
    current = ResidualFSQ(**json.loads(case["kwargs"]))
    assert current.codebooks[3, 999].tolist() == [1.0, 1.0, 1.0, 1.0]  # symmetric since 1.26


# --------------------------------------------------------------------------------------------------
# Quantize dropout, single process and under DDP (2 gloo processes)
# --------------------------------------------------------------------------------------------------


@needs_vqp
@pytest.mark.parametrize("multiple_of", [1, 2])
def test_quantize_dropout_draws_vqps_cut(multiple_of, backend):
    kwargs = dict(levels=[5, 5, 5], num_quantizers=6, quantize_dropout=True, quantize_dropout_cutoff_index=1,
                  quantize_dropout_multiple_of=multiple_of)
    reference, ours = vqp.ResidualFSQ(**kwargs).train(), ResidualFSQ(**kwargs, backend=backend).train()
    x = torch.randn(1, 8, 3)
    cuts = set()
    for seed in range(12):
        xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        qr, ir = reference(xr, rand_quantize_dropout_fixed_seed=seed)
        qo, io = ours(xo, rand_quantize_dropout_fixed_seed=seed)
        assert io.dtype == ir.dtype and torch.equal(io, ir), f"seed {seed}"
        float_close(qo, qr, f"quantized, seed {seed}")
        qr.backward(torch.ones_like(qr))
        qo.backward(torch.ones_like(qo))
        float_close(xo.grad, xr.grad, f"grad of x (dropped stages pass no gradient), seed {seed}", rtol=1e-5, atol=1e-5)
        cuts.add(int((io[0, 0] >= 0).sum()))
    assert len(cuts) > 1  # the cut varies with the seed
    # without a fixed seed both draw one integer from the global RNG: same seed, same cut
    torch.manual_seed(11)
    _, ir = reference(x.clone().requires_grad_(True))
    torch.manual_seed(11)
    _, io = ours(x.clone().requires_grad_(True))
    assert torch.equal(io, ir)
    # dropped stages decode to zero codes
    codes = ours.get_codes_from_indices(io)
    assert torch.equal(codes[(io[0, 0] < 0).nonzero().flatten()], torch.zeros_like(codes[(io[0, 0] < 0).nonzero().flatten()]))


def test_no_dropout_in_eval_or_without_grad():
    ours = ResidualFSQ(levels=[5, 5], num_quantizers=4, quantize_dropout=True).train()
    with torch.no_grad():
        _, indices = ours(torch.randn(1, 4, 2), rand_quantize_dropout_fixed_seed=0)
    assert (indices >= 0).all()
    _, indices = ours.eval()(torch.randn(1, 4, 2, requires_grad=True), rand_quantize_dropout_fixed_seed=0)
    assert (indices >= 0).all()


def _ddp_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=timedelta(seconds=60))
    torch.manual_seed(100 + rank)  # every rank draws a different local seed: only the all-reduce makes them agree
    plain = ResidualFSQ(levels=[5, 5, 5], num_quantizers=8, quantize_dropout=True, backend="torch").train()
    grouped = GroupedResidualFSQ(dim=6, groups=2, levels=[5, 5, 5], num_quantizers=8, quantize_dropout=True,
                                 backend="torch").train()
    kept = []
    for step in range(6):
        _, indices = plain(torch.randn(2, 4, 3, requires_grad=True))
        kept.append(int((indices[0, 0] >= 0).sum()))
        _, indices = grouped(torch.randn(2, 4, 6, requires_grad=True))
        kept.append(int((indices[0, 0, 0] >= 0).sum()))
        if rank == 0 and step % 2 == 0:
            # one rank alone runs training-mode forwards without grad (a sample, a log): no collective may run here
            # (vqp's GroupedResidualFSQ all-reduces a seed on every training-mode forward and hangs: issue #198)
            with torch.no_grad():
                plain(torch.randn(1, 2, 3))
                grouped(torch.randn(1, 2, 6))
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(kept))


def test_ddp_ranks_draw_the_same_cut_without_hanging():
    """2 gloo processes with different local RNG states draw the same cut every step (the seed is all-reduced), and an
    extra no-grad forward on one rank runs no collective, so nothing hangs."""
    kept = run_gloo_workers(_ddp_worker)
    assert kept[0] == kept[1]
    assert len(set(kept[0])) > 1


# --------------------------------------------------------------------------------------------------
# Errors, NaN, calibration, the kernels' CPU twin
# --------------------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="semantics must be one of"):
        ResidualFSQ(levels=[5, 5], num_quantizers=2, semantics="1.25")
    with pytest.raises(ValueError, match="a level of 2 needs the symmetric quantizer"):
        ResidualFSQ(levels=[2, 5], num_quantizers=2, semantics="pre-1.26")
    ResidualFSQ(levels=[2, 5], num_quantizers=2, semantics="pre-1.26", preserve_symmetry=True)  # allowed
    with pytest.raises(ValueError, match="soft_clamp_input_value must be None with bound_hard_clamp=True"):
        ResidualFSQ(levels=[5, 5], num_quantizers=2, soft_clamp_input_value=1.0)
    with pytest.raises(ValueError, match="bound_hard_clamp does not exist before vqp 1.26"):
        ResidualFSQ(levels=[5, 5], num_quantizers=2, semantics="pre-1.26", bound_hard_clamp=False)
    with pytest.raises(ValueError, match="always builds its stages with preserve_symmetry=True"):
        ResidualFSQ(levels=[5, 5], num_quantizers=2, preserve_symmetry=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'levles'"):
        ResidualFSQ(levels=[5, 5], num_quantizers=2, levles=[3])
    with pytest.raises(ValueError, match="supports noise_dropout=0.0 only"):
        ResidualFSQ(levels=[5, 5], num_quantizers=2, noise_dropout=0.5)
    with pytest.raises(ValueError, match="num_quantizers must be a positive int"):
        ResidualFSQ(levels=[5, 5], num_quantizers=0)
    with pytest.raises(ValueError, match="levels\\[0\\] must be at least 2"):
        ResidualFSQ(levels=[1, 5], num_quantizers=2)
    with pytest.raises(ValueError, match="divisible by groups"):
        GroupedResidualFSQ(dim=7, groups=2, levels=[5, 5], num_quantizers=2)

    m = ResidualFSQ(levels=[5, 5, 5], num_quantizers=3, dim=8)
    with pytest.raises(ValueError, match=r"expected an input of shape \(b, n, 8\), found \(2, 4, 3\)"):
        m(torch.randn(2, 4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(2, 4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices must have shape"):
        m.get_output_from_indices(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 125\).*found 125"):
        m.get_output_from_indices(torch.full((1, 2, 3), 125))
    with pytest.raises(IndexError, match="found -2"):
        m.get_codes_from_indices(torch.full((1, 2, 3), -2))
    with pytest.raises(ValueError, match="more than num_quantizers=3"):
        m.get_codes_from_indices(torch.zeros(1, 2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="quantize_dropout must be on"):
        m.get_codes_from_indices(torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer tensor"):
        m.get_codes_from_indices(torch.zeros(1, 2, 3))
    g = GroupedResidualFSQ(dim=6, groups=2, levels=[5, 5, 5], num_quantizers=2)
    with pytest.raises(ValueError, match="expected dim 6 at axis -1"):
        g(torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="one entry per group"):
        g.get_output_from_indices(torch.zeros(3, 1, 2, 2, dtype=torch.int64))


def test_backend_triton_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = ResidualFSQ(levels=[5, 5], num_quantizers=2, backend="triton")
    with pytest.raises(BackendUnavailableError, match="backend='triton' runs on CUDA tensors"):
        m(torch.randn(1, 2, 2))


def test_nan_tokens_get_index_minus_one_and_nan_output(backend):
    m = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, backend=backend)
    x = torch.randn(1, 5, 4)
    x[0, 2, 1] = float("nan")
    quantized, indices = m(x)
    assert (indices[0, 2] == -1).all() and (indices[0, [0, 1, 3, 4]] >= 0).all()
    assert quantized[0, 2, 1].isnan() and not quantized[0, [0, 1, 3, 4]].isnan().any()


@pytest.mark.parametrize("levels", [(8, 5, 3), (12, 30, 34, 36)], ids=["8x5x3", "12x30x34x36"])
@pytest.mark.parametrize("kind,semantics", [("sym_clamp", "current"), ("sym_tanh", "current"), ("tanh_shift", "pre-1.26")])
def test_thresholds_reproduce_the_stage_predicate(kind, semantics, levels):
    """Each stage's level from the thresholds equals vqp's op sequence on r / scale, next to every threshold.
    (Levels 12, 30, 34, 36: the CPU's atanh of the shift differs by an ulp when computed on a longer tensor than
    vqp's ``(d,)`` levels; the calibration must take vqp's constants.)"""
    tables = residual_tables(levels, 4, semantics, kind, "cpu")
    lv = torch.tensor(levels, dtype=torch.int32)
    d = len(levels)
    for s in range(4):
        thr = tables.thresholds[s]                                     # (d, max_level - 1)
        finite = thr[~thr.isnan()].reshape(-1)
        r = torch.cat([finite, finite.nextafter(torch.tensor(-float("inf"))), torch.randn(200)])
        r = r[:, None].expand(-1, d)
        expected = stage_level(r / tables.scales[s], kind, lv)
        got = (r[..., None] >= thr[None]).sum(-1).float()
        assert torch.equal(got, expected), f"stage {s}"


def test_kernels_cpu_twin_matches_the_kernels():
    """The custom ops' CPU implementation (used without the interpreter) against the kernels."""
    from fsq_triton.ops import residual as ops

    if not interpreting():
        pytest.skip("compares with the kernels under the interpreter")
    for kind, semantics, soft, mode in (("sym_clamp", "current", (1.2, 1.5, 1.1), ops.SOFT_DIVIDE),
                                        ("tanh_shift", "pre-1.26", None, ops.SOFT_NONE),
                                        ("tanh_shift", "pre-1.26", (1.2,), ops.SOFT_RECIPROCAL)):
        tables = residual_tables((8, 5, 3), 3, semantics, kind, "cpu", soft)
        x = torch.randn(2, 6, 11) * 1.5
        out_k, idx_k = ops.forward_triton(x, tables.stages, tables.guess, tables.channels, tables.basis, 2, 2, mode, False)
        out_t, idx_t = ops._torch_forward(x, tables.stages, tables.channels, tables.basis, 2, 2, mode)
        assert torch.equal(idx_k, idx_t) and torch.equal(out_k, out_t)
        g = torch.randn_like(x)
        grad_k = ops.backward_triton(g, x, tables.stages, tables.guess, tables.channels, 2, 2, ops.KINDS[kind], mode, False)
        grad_t = ops._torch_backward(g, x, tables.stages, tables.channels, 2, 2, ops.KINDS[kind], mode)
        torch.testing.assert_close(grad_k, grad_t, rtol=1e-5, atol=1e-6)


GUESS_CONFIGS = [
    ((8, 5, 5, 5), 8, "current", "sym_clamp"),
    ((8, 5, 3, 2), 4, "current", "sym_tanh"),
    ((8, 6, 5), 4, "pre-1.26", "tanh_shift"),
    ((2, 3, 40), 3, "current", "sym_clamp"),     # padding rows past L_j = 2 and 3, MAX_LEVEL 40
    ((10, 4), 5, "pre-1.26", "sym_tanh"),
    ((16, 12, 5), 3, "current", "sym_tanh"),     # atanh-spread thresholds: more half-level rows than 2 * max(L) - 3
]


def _stage_inputs(tables, levels):
    """Per channel, every stage's thresholds and the floats just below them, plus large, infinite and random values:
    ``(n, d)`` residuals that sit on each stage's steps."""
    d = len(levels)
    cols = []
    for j, level in enumerate(levels):
        thr = tables.thresholds[:, j, : level - 1].reshape(-1)
        special = torch.tensor([0.0, -0.0, 3e38, -3e38, float("inf"), -float("inf")])
        cols.append(torch.cat([thr, thr.nextafter(torch.tensor(-float("inf"))), thr.nextafter(torch.tensor(float("inf"))),
                               special, torch.randn(64) * 2]))
    n = max(c.numel() for c in cols)
    return torch.stack([torch.cat([c, torch.randn(n - c.numel())]) for c in cols], dim=1)  # (n, d)


@pytest.mark.parametrize("levels,q,semantics,kind", GUESS_CONFIGS, ids=lambda v: str(v).replace(" ", ""))
def test_guess_table_gives_the_compare_chains_levels(levels, q, semantics, kind):
    """The guess table's rule (``i = clamp(bits(fl(r * a + b)) - bits(2**22), 0, R - 1)``, then at most one threshold
    of row ``1 + i``), emulated in torch, against the compare chain on every threshold, its neighbours and extreme
    values of every stage; and the calibration keeps the guess for these configurations."""
    from fsq_triton.residual_levels import GUESS_MAGIC

    tables = residual_tables(levels, q, semantics, kind, "cpu")
    rows = tables.guess.shape[2] - 1
    assert tables.guess.shape[:2] == (q, len(levels)) and rows >= 2 * max(levels) - 3
    r_all = _stage_inputs(tables, levels)
    for s in range(q):
        for j in range(len(levels)):
            r = r_all[:, j]
            head, body = tables.guess[s, j, 0], tables.guess[s, j, 1:]
            bits = (r * head[0] + head[1]).view(torch.int32)
            i = (bits.clamp(GUESS_MAGIC, GUESS_MAGIC + rows - 1) - GUESS_MAGIC).long()
            row = body[i]
            passed = r >= row[:, 0]
            index = row[:, 3].view(torch.int32) + torch.where(passed, tables.basis[j], 0)
            quantized = torch.where(passed, row[:, 2], row[:, 1])
            level = (r[:, None] >= tables.thresholds[s, j][None, :]).sum(1)
            assert torch.equal(index, (level * tables.basis[j]).int()), (s, j)
            assert torch.equal(quantized, tables.quantized[s, j][level]), (s, j)


def test_guess_is_off_where_it_cannot_be_proven():
    """Stages whose thresholds underflow (80 stages of [8, 5, 5, 5]: equal thresholds) or spread too unevenly (tanh with
    64 levels: more than GUESS_MAX_ROWS half levels) get an empty table: the kernels count thresholds instead."""
    assert residual_tables((8, 5, 5, 5), 80, "current", "sym_clamp", "cpu").guess.shape[0] == 0
    assert residual_tables((64, 5), 2, "current", "sym_tanh", "cpu").guess.shape[0] == 0
    assert residual_tables((12, 5), 2, "current", "sym_tanh", "cpu").guess.shape[0] == 2


@pytest.mark.parametrize("levels,q,semantics,kind", GUESS_CONFIGS[:3] + [((64, 5), 3, "current", "sym_tanh")],
                         ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernels_with_and_without_the_guess_agree_bit_for_bit(levels, q, semantics, kind, channels_last):
    """Guess and correction against the compare chain in the kernels themselves (both layouts; dense channel-last
    tiles where ``d % 4 == 0``, 4-stage index rows where ``q % 4 == 0``), on inputs that put stage 0 on every step
    and the later stages near theirs, with quantize dropout cutting the last stage, and against the torch twin."""
    from fsq_triton.ops import residual as ops

    if not interpreting():
        pytest.skip("runs the kernels under the interpreter")
    tables = residual_tables(levels, q, semantics, kind, "cpu")
    d = len(levels)
    x = _stage_inputs(tables, levels)                                   # (n, d), stage 0 on its steps
    x = torch.cat([x, x * 1.0001, x + tables.quantized[0].max() * 0.5])
    x[5, 1] = float("nan")
    feature = x.t()[None].contiguous() if not channels_last else x[None].transpose(1, 2)   # (1, d, n)
    empty = tables.guess[:0]
    g = torch.randn_like(feature)
    for num_active in (q, q - 1):
        out_c, idx_c = ops.forward_triton(feature, tables.stages, empty, tables.channels, tables.basis, 1, num_active, 0,
                                          channels_last)
        out_t, idx_t = ops._torch_forward(feature, tables.stages, tables.channels, tables.basis, 1, num_active, 0)
        assert torch.equal(idx_c, idx_t)
        assert torch.equal(out_c.nan_to_num(7.0), out_t.nan_to_num(7.0))
        grad_c = ops.backward_triton(g, feature, tables.stages, empty, tables.channels, 1, num_active, ops.KINDS[kind], 0,
                                     channels_last)
        if tables.guess.shape[0] == 0:
            continue
        out_k, idx_k = ops.forward_triton(feature, tables.stages, tables.guess, tables.channels, tables.basis, 1,
                                          num_active, 0, channels_last)
        assert torch.equal(idx_k, idx_c)
        assert torch.equal(out_k.nan_to_num(7.0), out_c.nan_to_num(7.0))
        assert torch.equal(out_k.isnan(), out_c.isnan())
        grad_k = ops.backward_triton(g, feature, tables.stages, tables.guess, tables.channels, 1, num_active,
                                     ops.KINDS[kind], 0, channels_last)
        assert torch.equal(grad_k.nan_to_num(7.0), grad_c.nan_to_num(7.0))


def test_exported_from_the_package():
    assert fsq_triton.ResidualFSQ is ResidualFSQ and fsq_triton.GroupedResidualFSQ is GroupedResidualFSQ
    assert "ResidualFSQ" in fsq_triton.__all__ and "GroupedResidualFSQ" in fsq_triton.__all__


COMPILE_SCRIPT = r"""
import io, contextlib, json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fsq_triton.ops.residual as R

ints = lambda *names: {n: "i32" for n in names}
forward_types = {"x_ptr": "*bf16", "out_ptr": "*fp32", "idx_ptr": "*i32", "stage_ptr": "*fp32", "guess_ptr": "*fp32", "chan_ptr": "*fp32",
                 "basis_ptr": "*i32", "proj_ptr": "*fp32", "w_out_ptr": "*fp32", "b_out_ptr": "*fp32",
                 **ints("N", "num_n_blocks", "num_active", "proj_dim", "stride_xb", "stride_xc", "stride_xn", "stride_ob", "stride_oc",
                        "stride_on", "stride_ig", "stride_ib", "stride_in", "stride_pb", "stride_pc", "stride_pn",
                        "stride_hb", "stride_hc", "stride_hn")}
projected_types = {**forward_types, "proj_ptr": "*bf16"}  # the weights and bias go in float32
backward_types = {"g_ptr": "*fp32", "x_ptr": "*bf16", "dx_ptr": "*bf16", "stage_ptr": "*fp32", "guess_ptr": "*fp32", "chan_ptr": "*fp32",
                  **ints("N", "num_n_blocks", "num_active", "stride_gb", "stride_gc", "stride_gn", "stride_xb",
                         "stride_xc", "stride_xn", "stride_db", "stride_dc", "stride_dn")}
common = dict(G=2, D=4, Q=8, MAX_LEVEL=8, SOFT_CLAMP=1, GUESS_ROWS=14, DENSE=True, INDEX_ROWS=True, BLOCK_N=128,
              OFFSET_64=False, PROJECT_OUT=False, BLOCK_K=16, HAS_B_OUT=False, w_in_ptr=None, b_in_ptr=None, h_ptr=None,
              PROJECT_IN=False, HAS_B_IN=False, E_PAD=16, BLOCK_KI=32, IEEE_DOT=False, DOT_IN_F32=False)
projected = dict(PROJECT_OUT=True, BLOCK_K=32, HAS_B_OUT=True, stride_pc=1)
strided = dict(DENSE=False, INDEX_ROWS=False, OFFSET_64=True)
rows = []
for kernel, types, constexprs in (
    (R._residual_forward_kernel, forward_types, common),
    (R._residual_backward_kernel, backward_types, {**common, "KIND": 2}),
    (R._residual_backward_kernel, backward_types, {**common, "KIND": 0, "SOFT_CLAMP": 2}),
    (R._residual_forward_kernel, forward_types, {**common, **strided, "MAX_LEVEL": 40, "Q": 6, "GUESS_ROWS": 80}),
    (R._residual_forward_kernel, forward_types, {**common, **strided, "MAX_LEVEL": 40, "GUESS_ROWS": 0}),
    (R._residual_backward_kernel, backward_types, {**common, **strided, "KIND": 1, "GUESS_ROWS": 0}),
    (R._residual_forward_kernel, projected_types, {**common, **projected}),
    (R._residual_forward_kernel, projected_types, {**common, **strided, **projected, "HAS_B_OUT": False}),
    (R._residual_forward_kernel, {**projected_types, "w_in_ptr": "*bf16", "b_in_ptr": "*bf16", "h_ptr": "*fp32"},
     {k: v for k, v in {**common, **projected, "PROJECT_IN": True, "HAS_B_IN": True}.items()
      if k not in ("w_in_ptr", "b_in_ptr", "h_ptr")}),
):
    names = kernel.arg_names
    constexprs = {k: v for k, v in constexprs.items() if k in names}
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    # the projected launch (project_out fused only for dim % 16 == 0): proj contiguous, every pointer (torch's
    # allocations) and proj's rows aligned, as Triton marks them at launch
    aligned = [n for n in names if constexprs.get("PROJECT_OUT") and n not in constexprs
               and (n.endswith("_ptr") or n in ("proj_dim", "stride_pb", "stride_pn"))]
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    log = io.StringIO()  # Triton prints its ptxas -v report (TRITON_DUMP_PTXAS_LOG, fresh cache): registers, spills
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    log = log.getvalue()
    rows.append({"kernel": kernel.__name__, "ptx_has_tanh_path": "ex2.approx" in compiled.asm["ptx"],
                 "div_rn": "div.rn.f32" in compiled.asm["ptx"],
                 "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
                 "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))})
print(json.dumps(rows))
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The real compiler accepts both kernels (the interpreter-only tanh hook is a dead constexpr branch there),
    with the soft clamp's libdevice tanh and IEEE division in the PTX, and ptxas spills nothing (8 stages, 2 groups;
    the forward with project_out fused too, bfloat16, dense and strided with 64-bit offsets, and with project_in too)."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
               "TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": cache}
        result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in rows] == ["_residual_forward_kernel", "_residual_backward_kernel", "_residual_backward_kernel",
                                           "_residual_forward_kernel", "_residual_forward_kernel", "_residual_backward_kernel",
                                           "_residual_forward_kernel", "_residual_forward_kernel", "_residual_forward_kernel"]
    assert rows[0]["ptx_has_tanh_path"] and rows[0]["div_rn"]
    for row in rows:
        assert row["spill_bytes"] == 0 and row["registers"] <= 255, row


@needs_vqp
def test_bench_residual_cases_run_and_agree_with_vqp():
    """The bench's residual cases (smoke size): every row runs, and fsq_triton's indices equal vqp's."""
    pytest.importorskip("tqdm")
    from fsq_triton.bench import residual_cases
    from fsq_triton.bench.harness import Timer

    cpu = torch.device("cpu")
    cases = list(residual_cases.measure_cases("smoke", cpu, Timer(cpu, "smoke"), 10.0))
    assert [c["name"] for c in cases] == ["residual 8x[8,5,5,5]", "residual 8x[8,5,5,5] proj", "grouped ChatTTS-like"]
    for case in cases:
        for mode in ("inference", "training", "decode"):
            for name in ("fsq_triton", "reference"):
                entry = case["modes"][mode]["results"][name]
                assert entry["error"] is None and entry["median_ms"] > 0, (case["label"], mode, name, entry)
        assert case["modes"]["inference"]["results"]["fsq_triton"]["index_mismatches"] == 0
        assert case["modes"]["inference"]["bytes"] > 0


def test_custom_ops_pass_opcheck():
    """Schema, fake (shape) implementation, autograd registration and dispatch of both custom ops."""
    from fsq_triton.ops import residual as ops

    tables = residual_tables((8, 5, 5, 5), 3, "current", "sym_clamp", "cpu", (1.1, 1.2, 1.2, 1.2))
    x = torch.randn(2, 8, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.fsq_triton.residual_quantize.default,
                          (x, tables.stages, tables.guess, tables.channels, tables.basis, 2, 3, ops.KINDS["sym_clamp"], 1, False))
    torch.library.opcheck(torch.ops.fsq_triton.residual_quantize_backward.default,
                          (torch.randn(2, 8, 7), x.detach(), tables.stages, tables.guess, tables.channels, 2, 3, ops.KINDS["sym_clamp"],
                           1, False))


def test_torch_compile_fullgraph_matches_eager(backend):
    m = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4, dim=6, backend=backend).eval()
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 16, 6)
    q_eager, i_eager = m(x)
    q_compiled, i_compiled = compiled(x)
    assert torch.equal(i_compiled, i_eager)
    torch.testing.assert_close(q_compiled, q_eager, rtol=1e-6, atol=1e-6)
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    compiled(xc)[0].sum().backward()
    m(xe)[0].sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grouped", [False, True])
def test_soft_clamp_outside_the_kernel_gives_the_same_results(grouped, monkeypatch):
    """``soft_clamp_in_kernel = False`` (the soft clamp in torch ops, then the kernel) matches the fused soft clamp."""
    kwargs = dict(levels=[8, 5, 5, 5], num_quantizers=4)
    make = (lambda: GroupedResidualFSQ(dim=8, groups=2, **kwargs, backend="triton")) if grouped else \
        (lambda: ResidualFSQ(**kwargs, backend="triton"))
    if not interpreting():
        pytest.skip("runs the kernels under the interpreter")
    x = torch.randn(2, 9, 8 if grouped else 4)
    results = []
    for inside in (True, False):
        monkeypatch.setattr(ResidualFSQ, "soft_clamp_in_kernel", inside)
        module = make()
        xr = x.clone().requires_grad_(True)
        quantized, indices = module(xr)
        quantized.backward(torch.ones_like(quantized))
        results.append((quantized.detach(), indices, xr.grad))
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-5, atol=1e-6)


def test_decode_without_the_host_check_gives_nan_for_bad_indices(monkeypatch):
    """On CUDA the decode skips the range check (a device sync): an index outside the codebook decodes to NaN codes
    for that stage and token only, and -1 (a dropped stage) stays zero. Emulated on the CPU by unchecking it."""
    import fsq_triton.residual as residual_module

    m = ResidualFSQ(levels=[5, 5, 5], num_quantizers=3, quantize_dropout=True)
    indices = torch.tensor([[[3, 7, 11], [125, 2, -1], [4, -3, 9]]])
    checked = m.get_codes_from_indices(torch.where((indices < -1) | (indices >= 125), 0, indices))
    monkeypatch.setattr(residual_module, "_RANGE_CHECKED_DEVICES", ())
    codes = m.get_codes_from_indices(indices)                       # (q, b, n, d)
    bad = torch.tensor([[False, False, False], [True, False, False], [False, True, False]])  # (n, q)
    assert torch.isnan(codes[:, 0].permute(1, 0, 2)[bad]).all()
    assert torch.equal(codes[:, 0].permute(1, 0, 2)[~bad], checked[:, 0].permute(1, 0, 2)[~bad])
    assert torch.all(codes[2, 0, 1] == 0)                            # -1: a dropped stage
    out = m.get_output_from_indices(indices)
    assert torch.isnan(out[0, 1:]).all() and not torch.isnan(out[0, 0]).any()
    assert torch.isnan(m.get_codes_from_indices(indices[..., :2])[:, 0, 1, :][0]).all()  # padded stages stay valid


@pytest.mark.parametrize("check_passes", [True, False])
def test_soft_clamp_runs_in_the_kernel_where_it_is_torchs(check_passes, monkeypatch):
    """The default (None) runs the soft clamp in the kernel on a GPU only where ``soft_clamp_matches_torch`` finds the
    kernels' tanh and soft clamp equal to torch's there for the module's ``c`` (IEEE division for a tensor ``c``, the
    reciprocal multiply for a pre-1.26 float) and no threshold lies next to 0; always elsewhere (the interpreter's tanh
    is torch.tanh); True and False force either without asking."""
    ops = pytest.importorskip("fsq_triton.ops.residual")
    asked = []
    monkeypatch.setattr(ops, "soft_clamp_matches_torch", lambda *args: asked.append(args) or check_passes)
    cuda = torch.device("cuda", 0)
    module = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2)
    assert ResidualFSQ.soft_clamp_in_kernel is None and module._soft_clamp_flush_safe
    assert module._soft_clamp_runs_in_kernel(cuda) is check_passes
    assert asked == [(cuda, module._soft_clamp_key, ops.SOFT_DIVIDE)]
    assert module._soft_clamp_key == pytest.approx((8 / 7, 1.25, 1.25, 1.25))
    old = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, semantics="pre-1.26", soft_clamp_input_value=1.5)
    assert old._soft_clamp_runs_in_kernel(cuda) is check_passes
    assert asked[-1] == (cuda, (1.5,), ops.SOFT_RECIPROCAL)
    assert module._soft_clamp_runs_in_kernel(torch.device("cpu"))
    module._soft_clamp_flush_safe = False               # a threshold next to 0: torch ops, without asking
    assert not module._soft_clamp_runs_in_kernel(cuda) and len(asked) == 2
    for forced in (True, False):
        monkeypatch.setattr(ResidualFSQ, "soft_clamp_in_kernel", forced)
        assert module._soft_clamp_runs_in_kernel(cuda) is forced
        assert module._soft_clamp_runs_in_kernel(torch.device("cpu")) is forced
    assert len(asked) == 2


def test_tanh_probe_covers_every_region_of_tanhf():
    """The probe holds both signs of every exponent, denormals, zeros, infinities and NaNs, and every float near the
    two branch points of tanhf (|x| = 0.6 and 9.0109)."""
    ops = pytest.importorskip("fsq_triton.ops.residual")
    y = ops.tanh_probe_values("cpu")
    bits = y.view(torch.int32).long() & 0xFFFFFFFF
    exponents = ((bits >> 23) & 0xFF).unique()
    assert exponents.numel() == 256                                   # 0 (zero, denormals) .. 255 (inf, NaN)
    assert (y < 0).any() and (y > 0).any() and torch.isnan(y).any() and torch.isinf(y).any() and (y == 0).any()
    denormal = (bits & 0x7FFFFFFF > 0) & (bits & 0x7FFFFFFF < 0x00800000)
    assert denormal.sum() > 1000
    for point in ops.TANH_BRANCH_BITS:
        for sign in (0, 1 << 31):
            near = torch.arange(point - 50, point + 50) | sign
            assert torch.isin(near, bits).all()
    assert 4_000_000 < y.numel() < 5_000_000


def test_tanh_probe_runs_the_kernels_tanh():
    """``tanh_mismatches`` and ``soft_clamp_mismatches`` launch the kernels' tanh and soft clamp over the probe and
    count the bits that differ from torch's (under the interpreter the kernels' tanh is torch.tanh itself: 0);
    ``soft_clamp_matches_torch`` needs no check off CUDA."""
    if not interpreting():
        pytest.skip("runs the kernels under the interpreter")
    ops = pytest.importorskip("fsq_triton.ops.residual")
    assert ops.tanh_mismatches("cpu", stride=(1 << 22) + 1, window=8) == 0
    for c in (8 / 7, 1.25, 3.0, 0.5, -2.0):  # the whole soft clamp (IEEE division on the CPU), any c
        assert ops.soft_clamp_mismatches("cpu", c, ops.SOFT_DIVIDE, stride=(1 << 22) + 1, window=8) == 0
    assert ops.soft_clamp_matches_torch("cpu", (1.25,), ops.SOFT_DIVIDE)


def test_tanh_probe_counts_differing_bits(monkeypatch):
    """A tanh that is off by one ulp on some values is caught, and two NaNs of different bits agree."""
    if not interpreting():
        pytest.skip("runs the kernels under the interpreter")
    ops = pytest.importorskip("fsq_triton.ops.residual")
    real = torch.tanh
    off = lambda y: torch.where(y.abs() > 1, torch.nextafter(real(y), torch.tensor(0.0)), real(y))  # noqa: E731
    stride, window = (1 << 22) + 1, 8
    y = ops.tanh_probe_values("cpu", stride, window)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "tanh", off)
        count = ops.tanh_mismatches("cpu", stride, window)
    differ = (off(y).view(torch.int32) != real(y).view(torch.int32)) & ~torch.isnan(y)
    assert count == int(differ.sum()) > 0
    nan_bits = lambda y: torch.where(torch.isnan(y), torch.tensor(float("nan")).neg(), real(y))  # noqa: E731
    assert (nan_bits(y).view(torch.int32) != real(y).view(torch.int32)).any()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "tanh", nan_bits)
        assert ops.tanh_mismatches("cpu", stride, window) == 0


@needs_vqp
def test_float64_input_and_float64_soft_clamp_take_vqps_precision(backend):
    """Inputs vqp quantizes in float64 (a float64 input, or a float64 soft clamp tensor) match it there too."""
    for kwargs, dtype in ((dict(levels=[8, 5, 5], num_quantizers=3), torch.float64),
                          (dict(levels=[8, 5, 5], num_quantizers=3, bound_hard_clamp=False,
                                soft_clamp_input_value=torch.tensor([1.5, 1.2, 0.9], dtype=torch.float64)), torch.float32)):
        reference, ours = vqp.ResidualFSQ(**kwargs), ResidualFSQ(**kwargs, backend=backend)
        x = (torch.randn(2, 20, 3) * 1.5).to(dtype)
        qr, ir = reference(x)
        qo, io = ours(x)
        assert io.dtype == ir.dtype and torch.equal(io, ir)
        assert qo.dtype == qr.dtype and torch.equal(qo, qr)


def test_torch_export_matches_eager(backend):
    """torch.export of both modules (eval): the Triton path exports as the fsq_triton::residual_quantize op, or with
    projections of a width divisible by 16 as fsq_triton::residual_quantize_projected (project_out fused)."""
    for module, x, op in (
        (ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4, dim=16, backend=backend), torch.randn(2, 16, 16),
         "residual_quantize_projected"),
        (ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4, dim=6, backend=backend), torch.randn(2, 16, 6),
         "residual_quantize"),  # dim % 16 != 0: project_out stays nn.Linear
        (GroupedResidualFSQ(dim=8, groups=2, levels=[8, 5, 5, 5], num_quantizers=3, backend=backend),
         torch.randn(2, 16, 8), "residual_quantize"),
    ):
        module.eval()
        program = torch.export.export(module, (x,))
        q_eager, i_eager = module(x)
        q_exported, i_exported = program.module()(x)
        assert torch.equal(i_exported, i_eager) and torch.equal(q_exported, q_eager)
        ops = [str(node.target) for node in program.graph.nodes if "fsq_triton" in str(node.target)]
        assert (ops == [f"fsq_triton.{op}.default"]) == (backend == "triton"), ops


@needs_vqp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_cast_to_half_precision_matches_vqp(dtype, backend):
    """``module.to(half)`` casts vqp's scales and soft clamp buffers, and vqp then computes its stages in half
    precision: fsq_triton follows (on the torch path)."""
    kwargs = dict(levels=[8, 5, 5, 5], num_quantizers=4)
    reference, ours = vqp.ResidualFSQ(**kwargs).to(dtype), ResidualFSQ(**kwargs, backend=backend).to(dtype)
    assert ours.scales.dtype == reference.scales.dtype == dtype
    x = (torch.randn(2, 20, 4) * 1.5).to(dtype)
    qr, ir = reference(x)
    qo, io = ours(x)
    assert io.dtype == ir.dtype and torch.equal(io, ir)
    assert qo.dtype == qr.dtype and torch.equal(qo, qr)


@pytest.mark.parametrize("transform", ["grad", "vmap", "jvp", "forward-mode AD"])
@pytest.mark.parametrize("grouped", [False, True])
def test_torch_func_and_forward_ad_take_vqps_ops(transform, grouped, backend):
    """torch.func transforms and forward-mode AD run vqp's op sequence (the fused kernels' Functions have no vmap or
    jvp rule): the same values, and the same derivatives, on both backends."""
    from torch.func import grad, jvp, vmap

    torch.manual_seed(2)
    if grouped:
        make = lambda b: GroupedResidualFSQ(dim=32, groups=2, levels=[8, 5, 5, 5], num_quantizers=3, backend=b)  # noqa: E731
    else:
        make = lambda b: ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, dim=16, backend=b)  # noqa: E731
    ours, reference = make(backend), make("torch")
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 32 if grouped else 16)
    tangent = torch.randn_like(x)

    def run(module):
        if transform == "grad":
            return grad(lambda x: (module(x)[0] * tangent).sum())(x)
        if transform == "vmap":
            return vmap(lambda x: module(x[None])[0][0])(x)
        if transform == "jvp":
            return jvp(lambda x: module(x)[0], (x,), (tangent,))[1]
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            return fwAD.unpack_dual(module(fwAD.make_dual(x, tangent))[0]).tangent

    torch.testing.assert_close(run(ours), run(reference), rtol=0, atol=0)


@pytest.mark.parametrize("dim", [4, 16])
def test_double_backward_through_the_kernels_is_refused(dim, backend):
    """create_graph=True: the torch path gives second derivatives (the soft clamp's tanh has them); the kernels'
    backward is a kernel with no graph, so it refuses instead of silently dropping their terms."""
    m = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=3, dim=dim, backend=backend)
    x = torch.randn(2, 5, dim, requires_grad=True)
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.grad(m(x)[0].square().sum(), x, create_graph=True)
        return
    (g,) = torch.autograd.grad(m(x)[0].square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert gg.abs().sum() > 0


SOFT_CLAMPED = [dict(levels=levels, num_quantizers=8) for levels in
                ([8, 5, 5, 5], [5, 5, 5, 5], [7, 5, 5, 5, 5], [8, 8, 8, 5, 5, 5], [4, 4, 4], [3, 3, 3], [16, 9, 6])] + [
    dict(levels=[8, 5, 5, 5], num_quantizers=8, bound_hard_clamp=False, soft_clamp_input_value=c) for c in (1.5, 3.0)]


@pytest.mark.parametrize("kwargs", SOFT_CLAMPED, ids=lambda k: f"{k['levels']}-{k.get('soft_clamp_input_value', 'default')}")
def test_no_threshold_lies_next_to_zero(kwargs):
    """The kernel's soft clamp flushes tiny products to zero (``ops.residual.mul_rn``): for
    ``|x| < max(1, |c|) * 2**-126`` its ``r`` is 0 where torch's is below ``max(1, |c|) * 2**-126``. The usual
    configurations have no threshold within 2**-100 of 0, so the module's guard (64 times that band) lets them run the
    soft clamp in the kernel."""
    module = ResidualFSQ(**kwargs)
    thresholds = module._tables("cpu").thresholds
    near = thresholds[(thresholds > -2.0**-100) & (thresholds <= 2.0**-100)]
    assert near.numel() == 0, near
    assert module._soft_clamp_flush_safe


def test_soft_clamp_stays_in_torch_ops_where_a_threshold_is_next_to_zero():
    """Deep stacks resolve the residual below 2**-120 (40 stages of [8, 5, 5, 5]: thresholds near 2**-142), and a huge
    clamp widens the band: the guard keeps their soft clamp in torch ops; degenerate clamps are refused."""
    assert not ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=40)._soft_clamp_flush_safe
    wide = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=8, bound_hard_clamp=False, soft_clamp_input_value=1e37)
    assert not wide._soft_clamp_flush_safe
    for c in (0.0, float("inf"), float("nan"), [1.5, 0.0, 1.5, 1.5]):
        with pytest.raises(ValueError, match="finite and nonzero"):
            ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, bound_hard_clamp=False, soft_clamp_input_value=c)


@pytest.mark.parametrize("kwargs", SOFT_CLAMPED[:3] + SOFT_CLAMPED[-1:], ids=lambda k: str(k["levels"]))
def test_flushed_soft_clamp_quotients_change_nothing(kwargs):
    """vqp's ops on inputs whose ``x / c`` is below 2**-126 in magnitude (denormal quotients, whose soft clamp the
    kernel's flushing multiply makes 0), against the same ops on 0: the same indices and quantized outputs."""
    module = ResidualFSQ(**kwargs, backend="torch")
    c = torch.as_tensor(module.soft_clamp_input_value, dtype=torch.float32)
    d = len(kwargs["levels"])
    tiny = torch.tensor([1.4e-45, -1.4e-45, 2.0**-130, -(2.0**-127), 1.1e-38, -1.1e-38, 0.0])
    x = (tiny[:, None] * c.expand(d).clamp(max=1.0)).reshape(1, -1, d)       # every |x / c| < 2**-126
    assert ((x / c).abs() < 2.0**-126).all() and (x != 0).any()
    q_tiny, i_tiny = module(x)
    q_zero, i_zero = module(torch.zeros_like(x))
    assert torch.equal(i_tiny, i_zero) and torch.equal(q_tiny, q_zero)

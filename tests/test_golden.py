"""Parity with the golden vectors of the reference FSQ module (tests/data, see shared/golden/README.md)."""

import pytest
import torch

from conftest import GOLDEN_PATH, ref_indices_to_codes

from fsq_triton import FSQ

CASES = torch.load(GOLDEN_PATH, weights_only=True)["cases"]
CASE_NAMES = [case["name"] for case in CASES]


def test_golden_file_is_the_expected_one():
    data = torch.load(GOLDEN_PATH, weights_only=True)
    assert data["format"] == 1
    assert len(CASES) >= 10
    assert "large_magnitude_and_specials" in CASE_NAMES and "bf16_input_video" in CASE_NAMES


def case_by_name(name):
    return next(case for case in CASES if case["name"] == name)


def build(case, backend):
    m = FSQ(
        case["levels"],
        dim=case["dim"],
        num_codebooks=case["num_codebooks"],
        keep_num_codebooks_dim=case["keep_num_codebooks_dim"],
        backend=backend,
    )
    m.load_state_dict(case["state_dict"], strict=True)
    return m


def grad_tolerance(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype in (torch.bfloat16, torch.float16) else dict(rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_forward_backward(name, backend):
    case = case_by_name(name)
    m = build(case, backend)
    z = case["z"].clone().requires_grad_(True)
    out, indices = m(z)

    assert indices.dtype == torch.int32
    assert torch.equal(indices, case["indices"])
    assert out.dtype == z.dtype
    assert out.shape == case["out"].shape
    torch.testing.assert_close(out, case["out"].to(z.dtype), rtol=0, atol=1e-6, equal_nan=True)

    out.backward(case["grad_out"].to(out.dtype))
    assert z.grad.dtype == z.dtype
    torch.testing.assert_close(z.grad, case["grad_z"].to(z.dtype), **grad_tolerance(z.dtype), equal_nan=True)

    params = dict(m.named_parameters())
    assert set(params) == set(case["grad_params"])
    for pname, expected in case["grad_params"].items():
        torch.testing.assert_close(params[pname].grad, expected, rtol=0, atol=1e-5, msg=pname)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_indices_to_codes(name, backend):
    case = case_by_name(name)
    m = build(case, backend)
    with torch.no_grad():
        codes = m.indices_to_codes(case["indices"])
        codes_no_proj = m.indices_to_codes(case["indices"], project_out=False)
    for got, expected in ((codes, case["indices_to_codes"]), (codes_no_proj, case["indices_to_codes_no_proj"])):
        assert got.shape == expected.shape
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_module_attributes(name, backend):
    case = case_by_name(name)
    m = build(case, backend)
    assert m.codebook_size == case["codebook_size"]
    assert m.codebook_dim == len(case["levels"])
    assert m.num_codebooks == case["num_codebooks"]
    assert m.effective_codebook_dim == len(case["levels"]) * case["num_codebooks"]
    assert m.dim == (case["dim"] if case["dim"] is not None else m.effective_codebook_dim)
    assert m.has_projections == bool(case["state_dict"])
    assert m.keep_num_codebooks_dim == (
        case["keep_num_codebooks_dim"] if case["keep_num_codebooks_dim"] is not None else case["num_codebooks"] > 1
    )
    assert m._levels.dtype == torch.int32 and m._levels.tolist() == list(case["levels"])
    assert m._basis.dtype == torch.int32
    # non-persistent buffers: the state dict holds the projections only, as the reference's does
    assert set(m.state_dict()) == set(case["state_dict"])
    if case["implicit_codebook"] is not None:
        assert m.implicit_codebook.shape == case["implicit_codebook"].shape
        assert m.implicit_codebook.dtype == case["implicit_codebook"].dtype
        torch.testing.assert_close(m.implicit_codebook, case["implicit_codebook"], rtol=0, atol=0)
    else:
        # too large for the file: the buffer is still indices_to_codes(arange(codebook_size), project_out=False)
        expected = ref_indices_to_codes(torch.arange(m.codebook_size), case["levels"])
        if m.keep_num_codebooks_dim:
            expected = expected.flatten()
        torch.testing.assert_close(m.implicit_codebook, expected, rtol=0, atol=0)

"""``ReferenceFSQ`` against the golden outputs of the real reference module (CogVideo's FSQ, float32, CPU).

Run with ``pytest bench/test_reference.py`` (plain ``pytest`` collects only ``tests/``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsq_triton.bench.reference import ReferenceFSQ

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "data" / "fsq_reference_cases.pt"
CASES = torch.load(GOLDEN, weights_only=True)["cases"]
ATOL = 1e-6


def _module(case: dict) -> ReferenceFSQ:
    fsq = ReferenceFSQ(
        case["levels"], dim=case["dim"], num_codebooks=case["num_codebooks"],
        keep_num_codebooks_dim=case["keep_num_codebooks_dim"],
    )
    fsq.load_state_dict(case["state_dict"], strict=True)
    return fsq


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, equal_nan=True)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_forward_backward_decode_match_golden(case):
    fsq = _module(case)
    z = case["z"].clone().requires_grad_(True)

    out, indices = fsq(z)
    assert indices.dtype == torch.int32
    assert torch.equal(indices, case["indices"])
    _assert_close(out, case["out"])

    out.backward(case["grad_out"])
    _assert_close(z.grad, case["grad_z"])
    for name, grad in case["grad_params"].items():
        _assert_close(fsq.get_parameter(name).grad, grad)

    with torch.no_grad():
        _assert_close(fsq.indices_to_codes(case["indices"]), case["indices_to_codes"])
        _assert_close(fsq.indices_to_codes(case["indices"], project_out=False), case["indices_to_codes_no_proj"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_implicit_codebook_matches_golden(case):
    fsq = _module(case)
    assert fsq.codebook_size == case["codebook_size"]
    if case["implicit_codebook"] is None:  # the golden file leaves out codebooks over 5000 codes
        pytest.skip("no golden implicit codebook for this case")
    _assert_close(fsq.implicit_codebook, case["implicit_codebook"])


def test_implicit_codebook_skipped_above_limit():
    fsq = ReferenceFSQ([1024, 1025])
    assert fsq.codebook_size > 2**20 and fsq.implicit_codebook is None

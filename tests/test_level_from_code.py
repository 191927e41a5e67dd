"""The channel-first forward reads each element's level back from its code (``ops/fsq.py``: ``quantize_row``,
``twice_level``) instead of counting the thresholds passed: ``s = 1 / (codes[1] - codes[0])`` per channel (an
approximate reciprocal square root of the step squared on a GPU), then ``bits(fma(code, s, s + 2**22)) - bits(2**22)
= 2 * level``. That is exact only if, for every code of every valid level set and bound,

- ``s`` is within 1/4 of the true ``s`` (``hw``, or ``(L - 1) / 2`` for the symmetric bounds), so that ``s + 2**22``
  rounds to ``2**22 + s`` exactly (float32 numbers in ``[2**22, 2**23)`` are 1/2 apart), and
- ``code * s + s`` is within 1/4 of the level, so that the fused multiply-add (or, under the interpreter, a multiply
  and an add) rounds to ``2**22 + level``.

This checks both, with margin, for every level from 2 to 1000 (``validate_levels`` takes no more) under the four
bounds, with the codes made as ``levels._build_tables`` makes them (float32 division, or vqp's multiply-then-add for
the symmetric bounds; a GPU rounds these ops as the CPU does), and ``s`` off by up to 4 ulp either way (the GPU's
``rsqrt.approx`` is within 2 ulp)."""

import torch

from fsq_triton import levels as lv

MAX = 1000


def _codes(bound: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (L, MAX) float32 with NaN past each L's last level, the true s per L, the level of each column)."""
    L = torch.arange(2, MAX + 1, dtype=torch.int32)[:, None]
    k = torch.arange(MAX, dtype=torch.int32)[None, :]
    hw = L // 2
    if bound in ("tanh_shift", "clamp_shift"):
        codes = (k - hw).to(torch.float32) / hw
        s = hw.to(torch.float64)
    else:
        codes = lv.bound_code(k.to(torch.float32), bound, L)
        s = (L - 1).to(torch.float64) / 2
    return torch.where(k < L, codes, float("nan")), s, k.expand(codes.shape)


def test_every_code_gives_its_level():
    m = 2.0**22
    for bound in lv.BOUNDS:
        codes, s_true, level = _codes(bound)
        step = codes[:, 1:2] - codes[:, 0:1]  # float32, as the kernel subtracts
        s_exact = 1.0 / step.to(torch.float64)
        assert ((s_exact - s_true).abs() < 0.05).all(), bound
        for ulps in (-4, 0, 4):
            s = (s_exact * (1 + ulps * 2.0**-24)).to(torch.float32)
            s_plus_m = s + torch.tensor(m, dtype=torch.float32)  # float32 rounding, as the kernel adds
            assert torch.equal(s_plus_m.to(torch.float64) - m, s_true), (bound, ulps)
            ok = ~codes.isnan()
            exact = codes.to(torch.float64) * s.to(torch.float64) + s_plus_m.to(torch.float64)  # fma before rounding
            assert ((exact - m - level)[ok].abs() < 0.2).all(), (bound, ulps)
            # the interpreter multiplies, then adds (two roundings): the same levels
            unfused = (codes * s + s_plus_m)
            assert torch.equal((unfused.to(torch.float64) - m)[ok], level[ok].to(torch.float64)), (bound, ulps)
            # and the bit pattern is bits(2**22) + 2 * level
            fused = exact.to(torch.float32)
            bits = fused.view(torch.int32) - 0x4A800000
            assert torch.equal(bits[ok], 2 * level[ok]), (bound, ulps)


def test_the_codes_are_the_tables():
    """``_codes`` makes the codes of ``levels._build_tables`` (a few level sets, CPU)."""
    for bound in lv.BOUNDS:
        codes, _, _ = _codes(bound)
        for levels in ((2, 3, 4), (8, 5, 5, 5), (16, 7)):
            tables = lv.level_tables(levels, "cpu", bound)
            for j, L in enumerate(levels):
                assert torch.equal(tables.codes[j, :L], codes[L - 2, :L]), (bound, levels, j)

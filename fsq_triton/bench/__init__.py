"""The benchmark behind ``python -m fsq_triton bench``, shipped in the package so that it runs from an installed wheel.

- :mod:`fsq_triton.bench.harness`: the cases, the timing, the tables, results.json/.md/.png (needs the ``bench``
  extra: ``pip install "fsq_triton[bench]"``, which brings tqdm, matplotlib and numpy);
- :mod:`fsq_triton.bench.reference`: ``ReferenceFSQ``, the reference FSQ module op for op, the baseline of every
  comparison (plain torch and einops, no extra needed).

Nothing is imported here, so that ``import fsq_triton`` never pays for the benchmark's dependencies.
"""

from __future__ import annotations

import importlib.util

BENCH_EXTRA = 'pip install "fsq_triton[bench]"'
BENCH_REQUIREMENTS = ("tqdm", "matplotlib", "numpy")


def missing_requirements() -> list[str]:
    """The modules of the ``bench`` extra that cannot be imported here (empty when the extra is installed)."""
    return [name for name in BENCH_REQUIREMENTS if importlib.util.find_spec(name) is None]

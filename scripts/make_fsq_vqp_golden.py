"""Write ``tests/data/fsq_vqp132_golden.pt`` from vector-quantize-pytorch 1.32's ``FSQ`` itself.

    python scripts/make_fsq_vqp_golden.py            # in an environment with vector-quantize-pytorch==1.32.*

For every case (an option of vqp's FSQ, or a combination) it builds vqp's module on the CPU under a fixed seed and
saves: the constructor kwargs (as a Python literal: ``allowed_dtypes`` holds torch dtypes), the input, the upstream
gradient, the state_dict, ``out`` and ``indices`` (None without indices), the gradients of the input and of every
parameter, ``indices_to_codes(indices)``, and ``codes_to_indices`` of the codes that ``quantize`` gives for a second
input (``codes_in``), and the ``implicit_codebook`` buffer. The file is small (tiny shapes), so CI checks the fused kernels against vqp without vqp.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "fsq_vqp132_golden.pt"

# (name, kwargs as a Python literal, input shape, train)
CASES = [
    ("default", "dict(levels=[8, 5, 5, 3])", (2, 9, 4), False),
    ("hard_clamp", "dict(levels=[8, 5, 5, 3], bound_hard_clamp=True)", (2, 9, 4), False),
    ("symmetric", "dict(levels=[8, 5, 2, 3], preserve_symmetry=True)", (2, 9, 4), False),
    ("symmetric_hard_clamp", "dict(levels=[7, 4, 2], preserve_symmetry=True, bound_hard_clamp=True)", (2, 9, 3), False),
    ("channel_first", "dict(levels=[8, 5, 3], channel_first=True)", (2, 3, 9), False),
    ("channel_first_symmetric", "dict(levels=[6, 5, 3], channel_first=True, preserve_symmetry=True)", (2, 3, 9), False),
    ("channel_first_projections_no_bias", "dict(levels=[8, 5, 3], dim=6, channel_first=True, projection_has_bias=False)",
     (2, 6, 9), False),
    ("projections_no_bias", "dict(levels=[5, 4, 3], dim=10, num_codebooks=2, projection_has_bias=False)", (2, 7, 10), False),
    ("projections_hard_clamp", "dict(levels=[8, 6, 5], dim=7, bound_hard_clamp=True)", (2, 7, 7), False),
    ("image_symmetric_hard_clamp", "dict(levels=[8, 5, 3], preserve_symmetry=True, bound_hard_clamp=True)", (2, 3, 4, 5), False),
    ("no_indices", "dict(levels=[8, 5, 5, 3], return_indices=False)", (2, 9, 4), False),
    ("no_indices_symmetric_projections", "dict(levels=[4, 4, 2], dim=6, return_indices=False, preserve_symmetry=True)",
     (2, 7, 6), False),
    ("rotation", "dict(levels=[5, 5, 5], orthogonal_rotation=True)", (2, 9, 3), False),
    ("rotation_symmetric_projections_image",
     "dict(levels=[5, 5, 5], dim=8, num_codebooks=2, orthogonal_rotation=True, preserve_symmetry=True)", (2, 8, 3, 3), False),
    ("noise_dropout_eval", "dict(levels=[7, 5, 3], preserve_symmetry=True, noise_dropout=0.5)", (2, 9, 3), False),
    ("force_f32_off", "dict(levels=[8, 5, 5, 3], force_quantization_f32=False)", (2, 9, 4), False),
    ("allowed_f32_only_float64_input", "dict(levels=[8, 5, 5, 3], allowed_dtypes=(torch.float32,))", (2, 9, 4), False),
]


def _generate(out_path: Path) -> None:
    import torch
    import vector_quantize_pytorch
    from importlib.metadata import version
    from vector_quantize_pytorch import FSQ

    vqp_version = version("vector-quantize-pytorch")
    if not vqp_version.startswith("1.32."):
        raise SystemExit(f"needs vector-quantize-pytorch 1.32, found {vqp_version} ({vector_quantize_pytorch.__file__})")
    result = {"vqp_version": vqp_version, "torch_version": str(torch.__version__), "cases": []}
    for i, (name, kwargs_src, shape, train) in enumerate(CASES):
        kwargs = eval(kwargs_src, {"torch": torch})
        torch.manual_seed(1000 + i)
        module = FSQ(**kwargs)
        module.train(train)
        dtype = torch.float64 if "float64" in name else torch.float32
        x = (torch.randn(*shape) * 1.5).to(dtype)
        flat = x.view(-1)
        flat[:6] = torch.tensor([0.0, -0.0, 3.0e4, -3.0e4, 1.0, -1.0], dtype=dtype)  # zeros, saturation, the clamp's edges
        xr = x.clone().requires_grad_(True)
        out, indices = module(xr)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2000 + i)).to(out.dtype)
        out.backward(grad_out)
        codes_in = torch.randn(5, 3, module.codebook_dim, generator=torch.Generator().manual_seed(3000 + i)) * 1.5
        with torch.no_grad():
            codes = module.quantize(codes_in)
            case = {
                "name": name, "kwargs": kwargs_src, "train": train, "x": x, "grad_out": grad_out,
                "state_dict": {k: v.clone() for k, v in module.state_dict().items()},
                "out": out.detach(), "indices": indices,
                "grad_x": xr.grad, "param_grads": {n: p.grad.clone() for n, p in module.named_parameters()},
                "decoded": None if indices is None else module.indices_to_codes(indices),
                "codes_in": codes_in, "codes": codes, "codes_to_indices": module.codes_to_indices(codes),
                "implicit_codebook": module.implicit_codebook.clone() if module.return_indices else None,
            }
        result["cases"].append(case)
    torch.save(result, out_path)
    print(f"wrote {out_path} ({out_path.stat().st_size} bytes, {len(CASES)} cases)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    _generate(parser.parse_args().out)


if __name__ == "__main__":
    main()

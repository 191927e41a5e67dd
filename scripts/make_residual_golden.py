"""Write the residual FSQ golden files from vector-quantize-pytorch itself, one file per version.

    python scripts/make_residual_golden.py            # both versions, into tests/data/
    python scripts/make_residual_golden.py --versions 1.25.2 --keep-venvs /tmp/vqp-venvs

For each version it makes a throwaway virtual environment, installs ``torch==<this torch>`` and
``vector-quantize-pytorch==<version>`` into it with pip, and runs this same file there with ``--generate``,
which builds every case with vqp's ``ResidualFSQ``/``GroupedResidualFSQ`` on the CPU and saves, per case: the
constructor kwargs, the input, the upstream gradient, the state_dict, the quantized output, indices and all codes,
the gradients of the input and of every parameter, and the decode (``get_output_from_indices`` and
``get_codes_from_indices``), or the error vqp's decode raised. vqp 1.32 gives ``residual_golden_v1_32.pt`` (the
default ``semantics``), vqp 1.25.2 ``residual_golden_v1_25_2.pt`` (``semantics="pre-1.26"``); CI has only 1.32
installed, so the old semantics live in the file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_NAMES = {"1.32.0": "residual_golden_v1_32.pt", "1.25.2": "residual_golden_v1_25_2.pt"}

# (name, module, kwargs, input shape, extra): module "r" = ResidualFSQ, "g" = GroupedResidualFSQ
CASES_CURRENT = [
    ("plain", "r", dict(levels=[8, 5, 5, 5], num_quantizers=4), (2, 24, 4), {}),
    ("eight_stages", "r", dict(levels=[8, 5, 5, 5], num_quantizers=8), (2, 16, 4), {}),
    ("projections", "r", dict(levels=[8, 5, 5, 5], num_quantizers=3, dim=12), (2, 16, 12), {}),
    ("channel_first", "r", dict(levels=[5, 5, 5], num_quantizers=3, is_channel_first=True), (2, 3, 4, 5), {}),
    ("levels_2_3_4", "r", dict(levels=[2, 3, 4], num_quantizers=3), (2, 16, 3), {}),
    ("soft_tanh", "r", dict(levels=[7, 5, 3], num_quantizers=5, bound_hard_clamp=False), (2, 16, 3), {}),
    ("soft_clamp_float", "r", dict(levels=[8, 6], num_quantizers=3, bound_hard_clamp=False, soft_clamp_input_value=1.2), (2, 16, 2), {}),
    ("soft_clamp_list", "r", dict(levels=[8, 6], num_quantizers=3, bound_hard_clamp=False, soft_clamp_input_value=[1.5, 0.8]), (2, 16, 2), {}),
    ("dropout", "r", dict(levels=[5, 5, 5], num_quantizers=6, quantize_dropout=True, quantize_dropout_cutoff_index=1), (2, 16, 3),
     {"train": True, "seed": 7}),
    ("dropout_multiple_of", "r", dict(levels=[5, 5, 5], num_quantizers=6, quantize_dropout=True, quantize_dropout_multiple_of=2), (2, 16, 3),
     {"train": True, "seed": 3}),
    ("grouped", "g", dict(dim=8, groups=2, levels=[8, 5, 5, 5], num_quantizers=3), (2, 16, 8), {}),
    ("grouped_projections", "g", dict(dim=12, groups=2, levels=[5, 5, 5], num_quantizers=4), (2, 16, 12), {}),
    ("grouped_image", "g", dict(dim=8, groups=2, levels=[8, 5, 5, 5], num_quantizers=2, accept_image_fmap=True,
                                is_channel_first=True), (2, 8, 3, 4), {}),
]
CASES_PRE_1_26 = [
    ("plain", "r", dict(levels=[8, 5, 5, 5], num_quantizers=4), (2, 24, 4), {}),
    ("eight_stages", "r", dict(levels=[8, 5, 5, 5], num_quantizers=8), (2, 16, 4), {}),
    ("projections", "r", dict(levels=[8, 5, 5, 5], num_quantizers=3, dim=12), (2, 16, 12), {}),
    ("channel_first", "r", dict(levels=[5, 5, 5], num_quantizers=3, is_channel_first=True), (2, 3, 4, 5), {}),
    ("preserve_symmetry", "r", dict(levels=[7, 5, 3], num_quantizers=5, preserve_symmetry=True), (2, 16, 3), {}),
    ("soft_clamp", "r", dict(levels=[8, 5, 5, 5], num_quantizers=4, soft_clamp_input_value=1.5), (2, 16, 4), {}),
    ("dropout", "r", dict(levels=[5, 5, 5], num_quantizers=6, quantize_dropout=True, quantize_dropout_cutoff_index=1), (2, 16, 3),
     {"train": True, "seed": 7}),
    ("grouped", "g", dict(dim=8, groups=2, levels=[8, 5, 5, 5], num_quantizers=3), (2, 16, 8), {}),
    ("grouped_projections", "g", dict(dim=12, groups=2, levels=[5, 5, 5], num_quantizers=4), (2, 16, 12), {}),
]


def _generate(version: str, out_path: Path) -> None:
    import torch
    from vector_quantize_pytorch import GroupedResidualFSQ, ResidualFSQ

    cases = CASES_CURRENT if version != "1.25.2" else CASES_PRE_1_26
    result = {"vqp_version": version, "torch_version": str(torch.__version__), "cases": []}
    for i, (name, kind, kwargs, shape, extra) in enumerate(cases):
        torch.manual_seed(1000 + i)
        module = (ResidualFSQ if kind == "r" else GroupedResidualFSQ)(**kwargs)
        module.train(bool(extra.get("train")))
        x = torch.randn(*shape) * 1.5
        flat = x.view(-1)
        flat[:6] = torch.tensor([0.0, -0.0, 3.0e4, -3.0e4, 1.0, -1.0])  # zeros, saturation, the clamp's edges
        grad_out_seed = torch.Generator().manual_seed(2000 + i)
        xr = x.clone().requires_grad_(True)
        call = {"return_all_codes": True}
        if kind == "r" and "seed" in extra:
            call["rand_quantize_dropout_fixed_seed"] = extra["seed"]
        if kind == "g" and "seed" in extra:
            torch.manual_seed(extra["seed"])
        all_codes_error = ""
        try:
            quantized, indices, all_codes = module(xr, **call)
        except Exception as error:  # vqp's channel-first forward cannot return all codes (its decode misreads them)
            all_codes_error = f"{type(error).__name__}: {error}".splitlines()[0]
            if kind == "g" and "seed" in extra:
                torch.manual_seed(extra["seed"])
            quantized, indices = module(xr, **{**call, "return_all_codes": False})
            all_codes = None
        grad_out = torch.randn(quantized.shape, generator=grad_out_seed)
        quantized.backward(grad_out)
        case = {
            "name": name, "module": kind, "kwargs": json.dumps(kwargs), "train": bool(extra.get("train")),
            "seed": extra.get("seed"), "x": x, "grad_out": grad_out,
            "state_dict": {k: v.clone() for k, v in module.state_dict().items()},
            "quantized": quantized.detach(), "indices": indices,
            "all_codes": all_codes if kind == "r" or all_codes is None else list(all_codes),
            "all_codes_error": all_codes_error,
            "grad_x": xr.grad, "param_grads": {n: p.grad.clone() for n, p in module.named_parameters()},
        }
        try:
            with torch.no_grad():
                case["decoded"] = module.get_output_from_indices(indices)
                case["codes_from_indices"] = module.get_codes_from_indices(indices)
            case["decode_error"] = ""
        except Exception as error:  # vqp's decode of channel-first indices
            case["decoded"], case["codes_from_indices"] = None, None
            case["decode_error"] = f"{type(error).__name__}: {error}".splitlines()[0]
        result["cases"].append(case)
    torch.save(result, out_path)
    print(f"wrote {out_path} ({out_path.stat().st_size} bytes, {len(cases)} cases)")


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts" if sys.platform == "win32" else "bin") / "python"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="+", default=list(OUT_NAMES))
    parser.add_argument("--out-dir", type=Path, default=ROOT / "tests" / "data")
    parser.add_argument("--keep-venvs", type=Path, default=None, help="make (or reuse) the venvs here instead of a temp dir")
    parser.add_argument("--generate", nargs=2, metavar=("VERSION", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        _generate(args.generate[0], Path(args.generate[1]))
        return

    import torch

    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep_venvs or Path(tmp)
        for version in args.versions:
            venv = base / f"vqp-{version}"
            python = _venv_python(venv)
            if not python.exists():
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
                subprocess.run([str(python), "-m", "pip", "install", "-q", torch_pin, f"vector-quantize-pytorch=={version}"], check=True)
            out = args.out_dir / OUT_NAMES[version]
            subprocess.run([str(python), str(Path(__file__).resolve()), "--generate", version, str(out)], check=True)


if __name__ == "__main__":
    main()

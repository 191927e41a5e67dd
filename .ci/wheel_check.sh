#!/usr/bin/env bash
# CI: the package as a user gets it. Builds the sdist and the wheel (python -m build), installs the wheel
# outside the checkout (pip --target, no dependencies: the torch, triton, einops and the bench extra already
# in this environment serve it), then, from an empty folder with the checkout nowhere on the path, runs
#   python -m fsq_triton bench --quick --out X     and     python -m fsq_triton demo
# and checks that X/results.json, X/results.md and X/results.png are written and parse, that the package
# imported is the installed one, that the wheel ships py.typed, the bench and one version number, and that
# the installed fsq-triton script names itself in its help.
# About a minute on a 2-core CPU. Usage: bash .ci/wheel_check.sh   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$(command -v python || command -v python3)}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "== build (sdist and wheel)"
"$PY" -m build --sdist --wheel --outdir "$TMP/dist" "$ROOT" > "$TMP/build.log" 2>&1 || { cat "$TMP/build.log"; exit 1; }
ls "$TMP/dist"
WHEEL=$(ls "$TMP"/dist/fsq_triton-*.whl)
SDIST=$(ls "$TMP"/dist/fsq_triton-*.tar.gz)

echo "== install the wheel outside the checkout"
"$PY" -m pip install --quiet --no-deps --no-compile --target "$TMP/site" "$WHEEL"
mkdir "$TMP/elsewhere"
cd "$TMP/elsewhere"
# only the installed copy: no checkout on the path, no interpreter mode left over from a test run
export PYTHONPATH="$TMP/site" PYTHONNOUSERSITE=1
unset TRITON_INTERPRET

"$PY" - "$TMP/site" "$WHEEL" "$SDIST" <<'PYEOF'
import sys, tarfile, zipfile
from importlib import metadata
from pathlib import Path
import fsq_triton
site, wheel, sdist = sys.argv[1:]
assert Path(fsq_triton.__file__).resolve().is_relative_to(Path(site).resolve()), f"imported {fsq_triton.__file__}, not the wheel"
names = zipfile.ZipFile(wheel).namelist()
for needed in ("fsq_triton/py.typed", "fsq_triton/bench/harness.py", "fsq_triton/bench/reference.py", "fsq_triton/__main__.py"):
    assert needed in names, f"the wheel lacks {needed}"
version = metadata.version("fsq_triton")
assert version == fsq_triton.__version__, f"wheel metadata says {version}, fsq_triton.__version__ says {fsq_triton.__version__}"
sdist_names = tarfile.open(sdist).getnames()
assert any(n.endswith("fsq_triton/py.typed") for n in sdist_names), "the sdist lacks py.typed"
print(f"fsq_triton {version} from {Path(fsq_triton.__file__).parent}; wheel and sdist hold py.typed and the bench")
PYEOF

echo "== python -m fsq_triton bench --quick"
"$PY" -m fsq_triton bench --quick --out bench-out > bench.log 2>&1 || { cat bench.log; exit 1; }
tail -n 3 bench.log
"$PY" - <<'PYEOF'
import json
from pathlib import Path
out = Path("bench-out")
results = json.loads((out / "results.json").read_text())
assert results["cases"] and results["environment"]["command"].startswith("python -m fsq_triton bench --quick")
timed = [e for c in results["cases"] for m in c["modes"].values() for e in m["results"].values() if e["median_ms"]]
assert timed, "no timed result in results.json"
assert (out / "results.md").read_text().startswith("# FSQ benchmark")
assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "results.png is not a PNG"
print(f"results.json ({len(results['cases'])} cases, {len(timed)} timed cells), results.md, results.png: ok")
PYEOF

echo "== the installed script"
"$TMP/site/bin/fsq-triton" --help > script.log
head -n 1 script.log
grep -q "^usage: fsq-triton " script.log

echo "== python -m fsq_triton demo"
"$PY" -m fsq_triton demo | tee demo.log
grep -q "codebook usage" demo.log
echo "wheel check passed"

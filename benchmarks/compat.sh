#!/usr/bin/env bash
# The test suite on the lowest or the newest versions pyproject.toml allows, in a clean virtual environment.
#
# Usage: benchmarks/compat.sh lowest|newest [--venv DIR] [--pin NAME==VERSION]... [PYTEST ARGS...]
#
#   lowest   every dependency at its lower bound in pyproject.toml (`>=X` becomes `==X`; the project's
#            dependencies and the extras dev, hf and peft), then the project with --no-deps, then `pip check`.
#            What they depend on themselves is left to pip (the newest that fits). build-system.requires is
#            not pinned: torch needs a newer setuptools at run time, and pip builds the project in isolation.
#   newest   `pip install -e ".[dev,hf,peft]"`: the newest releases the index serves within pyproject's bounds
#            (and pip's configured constraints, if any).
#   --venv DIR   build the environment there and keep it (default: a temporary folder, removed at the end);
#                an existing DIR is reused as it is and the pins are installed over it (for bisecting).
#   --pin NAME==VERSION   replaces that package's pin (lowest) or adds it (newest), e.g. --pin lightning==2.5.3.
#   PYTEST ARGS  a subset of the tests (default: the whole suite), e.g. tests/test_ppo_training.py -k steady
#
# Prints the versions installed as one JSON line (`versions: {...}`), then runs
# `python -m pytest -q -p no:cacheprovider [PYTEST ARGS]` from the repository root and prints its summary line
# with the wall time. The exit status is pytest's (or pip's, if an install failed).
#
# Examples:
#   benchmarks/compat.sh lowest
#   benchmarks/compat.sh newest --venv /tmp/newest tests/test_hf.py tests/test_lora.py
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
MODE="${1:-}"
case "$MODE" in
    lowest | newest) shift ;;
    *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
VENV=""
PINS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --venv) VENV="$2"; shift 2 ;;
        --pin) PINS+=("$2"); shift 2 ;;
        *) break ;;
    esac
done
PYTHON="${PYTHON:-python3}"

if [[ -z "$VENV" ]]; then
    VENV="$(mktemp -d -t rlhf-compat-XXXXXX)"
    trap 'rm -rf "$VENV"' EXIT
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip_() {  # quiet, without the warnings about index folders that lack a package
    "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}

# The requirements of this mode, one a line: pyproject.toml's, with `>=X` turned into `==X` for lowest, and the
# --pin overrides applied by name.
mapfile -t REQS < <("$PY" - "$REPO/pyproject.toml" "$MODE" "${PINS[@]}" <<'EOF'
import sys, tomllib
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

path, mode, *pins = sys.argv[1:]
project = tomllib.load(open(path, "rb"))
reqs = list(project["project"]["dependencies"])
for extra in ("dev", "hf", "peft"):
    reqs += project["project"]["optional-dependencies"][extra]
out = {}
for text in reqs:
    req = Requirement(text)
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    if mode == "lowest":
        lower = [s.version for s in req.specifier if s.operator == ">="]
        if len(lower) != 1:
            sys.exit(f"{text}: no single lower bound (>=) to pin")
        out[canonicalize_name(req.name)] = f"{req.name}{extras}=={lower[0]}"
    else:
        out[canonicalize_name(req.name)] = text
for pin in pins:
    req = Requirement(pin)
    out[canonicalize_name(req.name)] = pin
print("\n".join(out.values()))
EOF
)

echo "mode: $MODE; venv: $VENV; requirements: ${REQS[*]}"
if [[ "$MODE" == lowest ]]; then
    pip_ install "${REQS[@]}"
    pip_ install --no-deps -e "$REPO"
    "$PY" -m pip --disable-pip-version-check check  # the pins satisfy each other and the project
else
    pip_ install -e "$REPO[dev,hf,peft]" "${REQS[@]}"  # REQS: the same requirements, plus any --pin
fi

"$PY" - "$REPO/pyproject.toml" "$MODE" <<'EOF'
import json, platform, sys, tomllib
from importlib.metadata import PackageNotFoundError, version
from pip._vendor.packaging.requirements import Requirement

project = tomllib.load(open(sys.argv[1], "rb"))
reqs = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
reqs += [r for extra in project["project"]["optional-dependencies"].values() for r in extra]
names = [Requirement(r).name for r in reqs] + ["numpy", "huggingface_hub", "rich", "accelerate"]
found = {"mode": sys.argv[2], "python": platform.python_version()}
for name in names:
    try:
        found[name] = version(name)
    except PackageNotFoundError:
        found[name] = None
print("versions:", json.dumps(found))
EOF

cd "$REPO"
# the tests that start `rlhf` in a subprocess must find this environment's, not another install's on PATH
export PATH="$VENV/bin:$PATH"
start=$(date +%s)
set +e
"$PY" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$VENV/pytest.log"
status=${PIPESTATUS[0]}
set -e
summary="$(grep -E '^=*[ ]*[0-9]+ (passed|failed|error|skipped|deselected)|^=*[ ]*no tests ran' "$VENV/pytest.log" | tail -n 1)"
echo "pytest ($MODE): ${summary:-no summary line} [wall $(( $(date +%s) - start )) s, exit $status]"
exit "$status"

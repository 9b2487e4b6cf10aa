#!/usr/bin/env bash
# Run HERE before a GPU lease: fills .gpu-lease/ (git-ignored through .git/info/exclude) with what
# the device machine lacks: Python 3.12 wheels of optuna, SQLAlchemy and their pure-Python needs,
# the peer libraries lightly and solo-learn, and Fashion-MNIST's four gz files. Then one device call does all the GPU checks:
#   run(command="bash scripts/gpu_lease.sh", carry=[".gpu-lease"], timeout_s=540)
# (docs/PERFORMANCE.md, "GPU checks").
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu-lease/' .git/info/exclude 2>/dev/null || echo '/.gpu-lease/' >> .git/info/exclude
rm -rf .gpu-lease
mkdir -p .gpu-lease/whl .gpu-lease/fashion-mnist
# The device's Python is 3.12 with torch, numpy, pandas, pyyaml, tqdm, psutil, pyarrow, seaborn,
# scikit-learn and pytest(-benchmark, -timeout) already; these are the missing ones, pinned to what
# this environment runs so both machines test the same versions.
py=".venv/bin/python"
wheels=()
for name in optuna SQLAlchemy alembic colorlog Mako cmaes; do
  wheels+=("$name==$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu-lease/whl "${wheels[@]}"
# The peers of tests/benchmarks/peers.py (pure Python; installed without their dependencies, as here).
peers=()
for name in lightly solo-learn; do
  peers+=("$name==$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu-lease/whl "${peers[@]}"
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpu-lease/fashion-mnist/
du -sh .gpu-lease
ls .gpu-lease/whl .gpu-lease/fashion-mnist

#!/usr/bin/env bash
# Sets everything up (Debian's Fashion-MNIST, a virtual environment, the project) and runs one of:
#   quickstart   the quickstart study, then its report
#   test         the whole test suite, then the loss-kernel speed gate against the committed baseline
#   setup        only the set-up
# Idempotent: a second call reuses the environment (re-installing only when pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-setup}"
venv="${HARNESS_VENV:-.venv}"
py="$venv/bin/python"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "== installing Debian's dataset-fashion-mnist"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist
fi

if [ ! -x "$py" ]; then
  echo "== creating the virtual environment $venv"
  python3 -m venv "$venv"
fi

stamp="$venv/.harness-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "== installing torch and the project into $venv"
  "$py" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
  "$py" -m pip install -q --disable-pip-version-check -e ".[dev]"
  echo "$wanted" > "$stamp"
fi

case "$what" in
  setup) ;;
  quickstart)
    "$venv/bin/harness" run studies/quickstart.yaml
    "$venv/bin/harness" report quickstart
    echo "== report: reports/quickstart/index.html (and report.md)"
    ;;
  test)
    "$py" -m pytest -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds --timeout=900
    "$venv/bin/harness" bench --quick --threads 1 --no-memory --db "sqlite:///${TMPDIR:-/tmp}/harness-ci-bench.db" \
      --compare harness/bench/baselines/ci-cpu.json --max-slowdown 50%
    ;;
  *)
    echo "usage: scripts/setup.sh [setup|quickstart|test]" >&2
    exit 2
    ;;
esac

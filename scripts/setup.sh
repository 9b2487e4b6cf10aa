#!/usr/bin/env bash
# Sets everything up (Debian's Fashion-MNIST, a virtual environment, the project) and runs one of:
#   quickstart   the quickstart study, then its report
#   test         the whole test suite (with a throwaway PostgreSQL server for the PostgreSQL tests,
#                unless HARNESS_TEST_POSTGRES_URL names one, Debian's chromium for the report's
#                browser test, slurm-wlm and munge for the one-node Slurm test), then the loss-kernel speed gate
#   setup        only the set-up
# Idempotent: a second call reuses the environment (re-installing only when pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-setup}"
venv="${HARNESS_VENV:-.venv}"
py="$venv/bin/python"

# Each stage says when it started and how long the script has run, so a slow or stuck stage shows in a log.
stage() { echo "== [$(date -u +%H:%M:%S), ${SECONDS}s in] $*"; }
# pip's configuration on some machines names local package folders that do not exist, and pip warns
# about each one on every install; those lines (hundreds) would bury the rest of a CI log.
quiet_pip() {
  local status=0
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } || status=$?
  return "$status"
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  stage "installing Debian's dataset-fashion-mnist"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist
fi

if [ ! -x "$py" ]; then
  stage "creating the virtual environment $venv"
  python3 -m venv "$venv"
fi

stamp="$venv/.harness-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  stage "installing torch and the project into $venv"
  quiet_pip "$py" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
  quiet_pip "$py" -m pip install -q --disable-pip-version-check -e ".[dev]"
  echo "$wanted" > "$stamp"
fi

# A throwaway PostgreSQL server (Debian's package) on a free local port, trust authentication,
# stopped and deleted when this script exits. The tests create one database per test in it.
as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_dir=""
stop_test_postgres() {
  if [ -n "$pg_dir" ] && [ -d "$pg_dir/data" ]; then
    as_postgres "$pg_bin/pg_ctl" -D "$pg_dir/data" stop -m fast >/dev/null 2>&1 || true
  fi
  [ -z "$pg_dir" ] || rm -rf "$pg_dir"
}
start_test_postgres() {
  if [ -n "${HARNESS_TEST_POSTGRES_URL:-}" ]; then return; fi
  if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
    stage "installing Debian's postgresql (for the PostgreSQL tests)"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
  fi
  pg_bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
  pg_dir="$(mktemp -d "${TMPDIR:-/tmp}/harness-pg.XXXXXX")"
  trap stop_test_postgres EXIT
  [ "$(id -u)" -ne 0 ] || chown postgres "$pg_dir"
  local port
  port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  as_postgres "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U harness >"$pg_dir/initdb.log"
  as_postgres "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w start \
    -o "-k $pg_dir -p $port -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" >/dev/null
  export HARNESS_TEST_POSTGRES_URL="postgresql://harness@127.0.0.1:$port/postgres"
  stage "PostgreSQL test server: $HARNESS_TEST_POSTGRES_URL"
}

case "$what" in
  setup) ;;
  quickstart)
    "$venv/bin/harness" run studies/quickstart.yaml
    "$venv/bin/harness" report quickstart
    echo "== report: reports/quickstart/index.html (and report.md)"
    ;;
  test)
    start_test_postgres
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
      stage "installing Debian's slurm-wlm and munge (tests/test_slurm.py runs a one-node Slurm cluster)"
      as_root apt-get update -q
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
    fi
    if ! command -v chromium >/dev/null; then
      stage "installing Debian's chromium (for the report's browser test)"
      as_root apt-get update -q
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    fi
    # The browser test fails (instead of skipping) without chromium; its screenshots stay here.
    export HARNESS_REQUIRE_BROWSER=1 HARNESS_TEST_ARTIFACTS="$PWD/test-artifacts"
    # --durations lists the slowest tests at the end; the outer timeout interrupts a suite that runs
    # far past its budget (pytest still prints its summary), well before CI's own 90-minute limit.
    stage "the test suite"
    timeout --signal=INT --kill-after=60 "${HARNESS_SUITE_TIMEOUT:-3600}" \
      "$py" -m pytest -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds --timeout=600 --durations=25
    stage "the loss-kernel speed gate"
    "$venv/bin/harness" bench --quick --threads 1 --no-memory --db "sqlite:///${TMPDIR:-/tmp}/harness-ci-bench.db" \
      --compare harness/bench/baselines/ci-cpu.json --max-slowdown 50%
    stage "done"
    echo "== browser screenshots of a real report: $HARNESS_TEST_ARTIFACTS/report-*.png"
    ;;
  *)
    echo "usage: scripts/setup.sh [setup|quickstart|test]" >&2
    exit 2
    ;;
esac

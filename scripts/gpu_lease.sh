#!/usr/bin/env bash
# Runs ON the device machine, in one call, after scripts/prepare_gpu_lease.sh here:
#   run(command="bash scripts/gpu_lease.sh", carry=[".gpu-lease"], timeout_s=540)
# Each step has its own time limit so the whole fits one call; every step's output lands in $OUT:
#   env.txt         the card, driver, torch and CUDA versions
#   pytest.log      the CUDA-gated tests (augmentation, data, training, bench plumbing)
#   throughput.md   every method at batch 512 with resnet18 against the seed loop (+ .json)
#   bench.txt       `harness bench --device cuda`: every loss kernel, reference vs fast
#   pipeline.txt    the batched augmentation against the seed's PIL pipeline
#   shard_pipeline.txt  two views at 224 px from a prepared shard, eager and compiled (+ .json)
#   peers.md        the loss kernels against lightly's and solo-learn's on the card (issue 12)
# The steps run in order of what no earlier lease has measured yet (the peers and the 224-px shard
# pipeline first), so that a call cut at its time limit still brings those back.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-lease-out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu-lease/whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" HARNESS_DATA_ROOT="$PWD/.gpu-lease" PYTHONUNBUFFERED=1
export HARNESS_CACHE_DIR=/tmp/harness-cache

{
  nvidia-smi
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  python3 -c "import optuna, sqlalchemy; print('optuna', optuna.__version__, 'sqlalchemy', sqlalchemy.__version__)"
} >"$out/env.txt" 2>&1

timeout 100 python3 tests/benchmarks/peers.py --device cuda --shapes cuda --rounds 5 \
  --kernels nt_xent,infonce,swav,swav_multicrop,dino_multicrop >"$out/peers.md" 2>&1
echo "peers exit $?" >>"$out/peers.md"

timeout 150 python3 scripts/shard_pipeline.py "$out" --device cuda --image-size 224 >"$out/shard_pipeline.txt" 2>&1
echo "shard_pipeline exit $?" >>"$out/shard_pipeline.txt"

timeout 150 python3 -m pytest -q -p no:cacheprovider -x --timeout=140 \
  tests/test_augment.py tests/test_data.py tests/test_train.py tests/test_bench.py tests/test_backbones.py \
  >"$out/pytest.log" 2>&1
echo "pytest exit $?" >>"$out/pytest.log"

timeout 200 python3 scripts/gpu_throughput.py "$out" --device cuda >"$out/throughput.log" 2>&1
echo "gpu_throughput exit $?" >>"$out/throughput.log"

timeout 120 python3 -m harness bench --device cuda --db "sqlite:////tmp/gpu-bench.db" >"$out/bench.txt" 2>&1
echo "bench exit $?" >>"$out/bench.txt"

timeout 60 python3 -m harness bench pipeline --device cuda --db "sqlite:////tmp/gpu-bench.db" >"$out/pipeline.txt" 2>&1
echo "pipeline exit $?" >>"$out/pipeline.txt"
tail -n 5 "$out"/*.txt "$out"/*.log "$out"/*.md

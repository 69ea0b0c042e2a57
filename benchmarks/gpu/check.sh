#!/usr/bin/env bash
# Run ON the lent GPU machine (see prepare.sh), one or more stages per call; logs and results go to $OUT.
#   suite   the test suite on the GPU (8 processes)                          ~4 min
#   bench   training throughput and MFU, small and base, plain loop beside   ~2 min
#   demo    `expandlm demo` with its GPU defaults (small, 1.5 min a stage)    ~5 min
#   grow    a 0.5B Qwen2-shaped base grown with recipes (issue 19 item 5)     ~2 min
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EXPANDLM_DATA=$PWD/.gpu/data EXPANDLM_CACHE=/tmp/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
    suite) timeout 420 python3 -m pytest -q -p no:cacheprovider -n 8 -ra 2>&1 | tee "$OUT/suite.log" | tail -40 ;;
    bench) timeout 300 python3 benchmarks/train_throughput.py --presets small base --batch-size 64 --steps 20 \
             --warmup 5 --out "$OUT/train_throughput_gpu.json" 2>&1 | tail -8 ;;
    demo)  rm -rf /tmp/demo; timeout 480 python3 -m expandlm demo --out /tmp/demo 2>&1 | tee "$OUT/demo.log" | tail -30
           cp /tmp/demo/report.md /tmp/demo/results.json /tmp/demo/learning_curves.png "$OUT/" 2>/dev/null ;;
    grow)  timeout 300 python3 benchmarks/grow_at_scale.py --steps 50 --batch-size 8 --work /tmp/grow \
             --out "$OUT/grow_at_scale" 2>&1 | tail -6 ;;
    *) echo "unknown stage $stage (suite | bench | demo | grow)" ;;
  esac
done
echo "== done $(date +%T)"

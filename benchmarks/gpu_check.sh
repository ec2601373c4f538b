#!/usr/bin/env bash
# The GPU path's check and benchmark, as one script for a lent GPU machine (python3 there has a CUDA
# torch, numba, transformers; pydantic & co. travel as wheels in .whl/). Writes its logs under $OUT.
#   bash benchmarks/gpu_check.sh
# 1. tests/test_device_cuda.py: every method on cuda == on cpu (tiny Llama), inputs really on the GPU.
# 2. benchmarks/speed.py --device cuda, then the same methods on the CPU of the same machine.
# 3. benchmarks/thread_cpu.py: where DELLA's CPU goes on that machine's cores (threads, cores busy over time).
# PROFILE=method: also a py-spy profile of that method on cuda (py-spy's wheel in .whl/).
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MERGESMITH_BENCH_CACHE=/tmp/speedbench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numba, transformers; print('torch', torch.__version__, 'numba', numba.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), 'cpus', torch.get_num_threads())"
echo "== tests"
MERGESMITH_CUDA_REPORT=$OUT/cuda_errors.jsonl timeout ${TEST_TIMEOUT:-240} python3 -m pytest -p no:cacheprovider -q -rf \
  tests/test_device_cuda.py 2>&1 | tee "$OUT/pytest.log" | tail -25
python3 - "$OUT/cuda_errors.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
print("cuda vs cpu, largest relative error per method:",
      ", ".join(f"{r['method']} {r['rel_err']:.1e}" for r in sorted(rows, key=lambda r: -r["rel_err"])))
EOF
METHODS=${METHODS:-linear,task_arithmetic,ties,dare_ties,della,tsv_m}
echo "== speed.py --device cuda"
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/speed.py --methods "$METHODS" --device cuda --json "$OUT/speed_cuda.json" 2>&1 | tee "$OUT/speed_cuda.log"
if [ -n "$PROFILE" ] && [ -x /tmp/site/bin/py-spy ]; then  # where the time of one cuda merge goes
  echo "== py-spy: $PROFILE --device cuda"
  timeout ${PROFILE_TIMEOUT:-90} /tmp/site/bin/py-spy record --subprocesses --threads -r 50 --format raw \
    -o "$OUT/profile_$PROFILE.txt" -- python3 benchmarks/speed.py --methods "$PROFILE" --device cuda 2>&1 | tail -3
fi
echo "== speed.py --device cpu (same machine, all its cores)"
timeout ${CPU_TIMEOUT:-120} python3 benchmarks/speed.py --methods "${CPU_METHODS:-linear,ties,dare_ties,della}" --json "$OUT/speed_cpu.json" 2>&1 | tee "$OUT/speed_cpu.log"
# DELLA used ~3 of 16 cores there (ninth session): CPU per thread and cores busy over time, to see what serialises
echo "== thread_cpu.py della, all cores and 4 threads"
for t in "" 4; do
  timeout ${SCALING_TIMEOUT:-60} python3 benchmarks/thread_cpu.py della ${t:+--threads $t} --timeline 2>&1 | tee -a "$OUT/scaling.log" | head -12
done

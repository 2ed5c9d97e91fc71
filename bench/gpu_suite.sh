#!/usr/bin/env bash
# The GPU suite (issue #4): one script, < 5 minutes on one GPU, everything it measures under OUT_DIR.
#
#   bench/gpu_suite.sh OUT_DIR
#
# 1. CUDA tests: kernels vs their PyTorch twins, the engine vs plain autograd (tests/test_kernels.py,
#    tests/test_cuda.py)                                  -> tests.txt, tests.xml
# 2. kernel bandwidth vs eager and torch.compile, and the device's copy bandwidth
#                                                         -> kernels.md, kernels.json
# 3. end-to-end: Glow stage step time and peak memory, kernels on/off vs plain autograd
#                                                         -> glow_step.md, glow_step.json
# 4. RevNet stage providers (plain, checkpoint, revgrad, memcnn/RevLib when installed) via `revgrad bench`
#                                                         -> bench/ (JSON, PNG if matplotlib, table)
# 5. step time and peak memory of RevNet-38/110/164 and a Glow stage, same providers
#                                                         -> models.txt, models.json
# 6. deferred checks: the RevNet stage with check="correct", checks read per block vs deferred
#                                                         -> deferred_checks.txt, deferred_checks.json
# Each part has its own time limit; a failing part is recorded and the suite goes on.
set -uo pipefail
out="${1:?usage: bench/gpu_suite.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -c "import revgrad" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null
} >"$out/env.txt" 2>&1
status=0
part() {  # part NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  [ $rc -eq 0 ] || status=1
}
part tests 80 python3 -m pytest tests/test_kernels.py tests/test_cuda.py -q -p no:cacheprovider -rs \
  --junitxml="$out/tests.xml"
part kernels 70 python3 bench/kernel_bandwidth.py --out "$out"
part glow_step 40 python3 bench/glow_step.py --out "$out"
part revnet_bench 40 python3 -m revgrad bench --quick --device cuda --out "$out/bench"
part models 40 python3 bench/report.py models --device cuda --batch 64 --rounds 3 --json "$out/models.json"
part deferred_checks 20 python3 bench/deferred_checks.py --device cuda --rounds 8 --out "$out"
cat "$out/summary.txt"
exit $status

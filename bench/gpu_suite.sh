#!/usr/bin/env bash
# The GPU suite: one script, under 10 minutes on one GPU including the install, everything it measures
# under OUT_DIR, each part's results written as the part ends (a run cut short keeps what it finished).
#
#   bench/gpu_suite.sh OUT_DIR              # on a machine with a CUDA GPU
#   bench/gpu_suite.sh --dry-run OUT_DIR    # on a CPU: every part, tiny sizes, kernels through
#                                           # Triton's interpreter (proves the plumbing; ~1-2 minutes)
#
# 0. install: `pip install --no-deps --no-build-isolation -e .` unless `import revgrad.kernels` already
#    finds this checkout from outside the tree; then that import, from /tmp. Failure ends the suite
#    (the kernel tests would otherwise skip and the suite pass).     -> install.txt, env.txt
# Then, in the order of their value:
# 1. tests: kernels vs their PyTorch twins, the engine vs plain autograd on CUDA (tests/test_kernels.py,
#    tests/test_cuda.py; REVGRAD_REQUIRE_KERNELS=1: a kernel test cannot skip) -> tests.txt, tests.xml
# 2. kernels: GB/s of each kernel vs eager and torch.compile, the device's copy bandwidth, the
#    roofline time of each op                                        -> kernels.md, kernels.json
# 3. step time: the Glow stage with kernels on/off vs plain autograd (glow_step.md, .json); checks
#    read per block vs deferred (deferred_checks.txt, .json); the RevNet stage's providers over depth
#    via `revgrad bench` (bench/)
# 4. models: step time and peak memory of RevNet-38/110/164 and a Glow stage -> models.txt, models.json
# 5. largest batch of the RevNet stage in a 4 GiB budget            -> largest_batch.txt, .json
# 6. RevViT-B/16 (224 px, 12 layers, batch 64): step time, held and peak memory of plain autograd,
#    checkpointing and revgrad off/correct, and the largest batch in an 8 GiB budget, via
#    `revgrad bench --workload vit`                                  -> vit_bench.txt, vit/bench.json
# Each part has its own time limit, cut to what is left of the suite's budget (REVGRAD_SUITE_SECONDS,
# default 570); a failing part is recorded in summary.txt and the suite goes on. Tests compute float32
# convolutions in IEEE float32 (tests/conftest.py); benchmarks keep PyTorch's defaults (env.txt).
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:?usage: bench/gpu_suite.sh [--dry-run] OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd -P)"
cd "$(dirname "$0")/.."
repo="$(pwd -P)"
export PYTHONUNBUFFERED=1 REVGRAD_REQUIRE_KERNELS=1
if [ $dry = 1 ]; then
  export TRITON_INTERPRET=1 REVGRAD_TEST_DEVICE=cpu
else
  unset TRITON_INTERPRET REVGRAD_TEST_DEVICE
fi
deadline=$((SECONDS + ${REVGRAD_SUITE_SECONDS:-570}))
: >"$out/summary.txt"

fatal() {
  echo "suite: $1 (see $out/install.txt)" | tee -a "$out/summary.txt" >&2
  exit 2
}

# 0. Install. The check runs from /tmp: from the repository root the source tree would satisfy
# `import revgrad` without revgrad.kernels (installed from kernels/ by pyproject.toml).
installed() {
  (cd /tmp && python3 -c 'import os, sys, revgrad, revgrad.kernels
here = os.path.realpath(revgrad.__file__)
print("revgrad from", here, "| kernels from", os.path.realpath(revgrad.kernels.__file__))
sys.exit(0 if here.startswith(os.path.join(sys.argv[1], "")) else 3)' "$repo") >>"$out/install.txt" 2>&1
}
start=$SECONDS
if ! installed; then
  python3 -m pip install --no-deps --no-build-isolation -e . >>"$out/install.txt" 2>&1 \
    || fatal "pip install -e . failed"
  installed || fatal "revgrad.kernels of this checkout does not import from outside the tree after the install"
fi
echo "install: ok in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
{
  date -u
  [ $dry = 1 ] && echo "DRY RUN on the CPU: kernels through Triton's interpreter, tiny sizes; no number here means anything"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
c = torch.backends.cudnn
print('float32 precision (benchmarks): cudnn conv', getattr(getattr(c, 'conv', None), 'fp32_precision', c.allow_tf32),
      '| cuda matmul', getattr(torch.backends.cuda.matmul, 'fp32_precision', torch.backends.cuda.matmul.allow_tf32))"
  git rev-parse --short HEAD 2>/dev/null
} >"$out/env.txt" 2>&1

status=0
part() {  # part NAME LIMIT_S COMMAND...: runs under min(LIMIT_S, time left), records its rc
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS)) begin=$SECONDS
  if [ $left -lt 15 ]; then
    echo "$name: skipped, ${left} s of the suite's budget left" | tee -a "$out/summary.txt"
    status=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout --kill-after=5 "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  local note=""
  [ $rc -eq 124 ] && note=" (timed out after $limit s)"
  echo "$name: rc=$rc in $((SECONDS - begin)) s$note" | tee -a "$out/summary.txt"
  [ $rc -eq 0 ] || status=1
}

if [ $dry = 1 ]; then
  part tests 150 python3 -m pytest tests/test_cuda.py tests/test_kernels.py -q -p no:cacheprovider -rs \
    -k "test_cuda or 2x2 or dispatch or launchers" --junitxml="$out/tests.xml"
  part kernels 90 python3 bench/kernel_bandwidth.py --out "$out" --dry-run
  part glow_step 60 python3 bench/glow_step.py --out "$out" --batch 2 --size 8 --depth 2 --hidden 8 \
    --rounds 1 --steps 1
  part deferred_checks 30 python3 bench/deferred_checks.py --device cpu --blocks 2 --batch 2 --rounds 1 --out "$out"
  part revnet_bench 60 python3 -m revgrad bench --device cpu --depths 2 4 --batch 2 --channels 8 --size 8 \
    --steps 1 --warmup 0 --no-progress --out "$out/bench"
  part models 60 python3 bench/report.py models --device cpu --batch 2 --rounds 1 --models glow \
    --glow-steps 2 --glow-hidden 8 --json "$out/models.json"
  part largest_batch 60 python3 bench/report.py largest-batch --device cpu --budget-mib 8 --depth 2 \
    --tolerance 0.5 --json "$out/largest_batch.json"
  part vit_bench 90 python3 -m revgrad bench --workload vit --device cpu --dim 16 --heads 2 --size 16 --patch 8 \
    --depths 2 --batch 2 --steps 1 --warmup 0 --providers plain checkpoint revgrad-off revgrad-correct \
    --budget-mib 1 --no-progress --out "$out/vit"
else
  part tests 150 python3 -m pytest tests/test_kernels.py tests/test_cuda.py -q -p no:cacheprovider -rs \
    --junitxml="$out/tests.xml"
  part kernels 90 python3 bench/kernel_bandwidth.py --out "$out"
  part glow_step 60 python3 bench/glow_step.py --out "$out"
  part deferred_checks 30 python3 bench/deferred_checks.py --device cuda --rounds 8 --out "$out"
  part revnet_bench 45 python3 -m revgrad bench --quick --device cuda --no-progress --out "$out/bench"
  part models 75 python3 bench/report.py models --device cuda --batch 64 --rounds 3 --json "$out/models.json"
  part largest_batch 75 python3 bench/report.py largest-batch --device cuda --budget-mib 4096 --depth 32 \
    --json "$out/largest_batch.json"
  part vit_bench 90 python3 -m revgrad bench --workload vit --device cuda --dim 768 --heads 12 --size 224 \
    --patch 16 --depths 12 --batch 64 --steps 5 --providers plain checkpoint revgrad-off revgrad-correct \
    --budget-mib 8192 --no-progress --out "$out/vit"
fi
echo "suite: $([ $status = 0 ] && echo ok || echo 'FAILED parts above') in $SECONDS s; results in $out" \
  | tee -a "$out/summary.txt"
exit $status

#!/usr/bin/env bash
# The whole GPU pass in one command: probe, build the cuSPARSELt extension, GPU tests, benchmarks.
# Usage (repo root, on a CUDA machine): bash benchmarks/gpu_suite.sh [OUTDIR] [STEPS] [BENCH_ARGS]
#   STEPS: comma list of probe,build,test,kernels,gemm,ffn,gpt2 (default: all); BENCH_ARGS: e.g. --quick
# Writes at most 8 files into OUTDIR (default $OUT or benchmarks/results/raw).
set -u
OUTDIR=${1:-${OUT:-benchmarks/results/raw}}
STEPS=${2:-probe,build,test,kernels,gemm,ffn,gpt2}
BENCH_ARGS=${3:-}  # e.g. --quick
. "$(dirname "$0")/gpu_env.sh"

if has probe; then
  {
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"
    $PY -c "from sste_jax.kernels import cusparselt as c; print('cusparselt at', c._cusparselt_dir()); print('nvcc', c._nvcc())"
    nvcc --version | tail -1
  } > "$OUTDIR/probe.txt" 2>&1
  cat "$OUTDIR/probe.txt"
fi
if has build; then
  { time $PY -c "from sste_jax.kernels import cusparselt as c; print(c.build(force=True))"; } >> "$OUTDIR/probe.txt" 2>&1
  tail -5 "$OUTDIR/probe.txt"
fi
if has test; then
  timeout 240 $PY -m pytest ${TESTS:-tests/sste_jax/test_cusparselt.py tests/sste_jax/test_kernels.py} -m gpu -o addopts= --integration -q -rs -p no:cacheprovider \
    > "$OUTDIR/pytest_gpu.log" 2>&1
  tail -25 "$OUTDIR/pytest_gpu.log"
fi
if has kernels; then
  timeout 200 $PY benchmarks/bench_kernels.py --out "$OUTDIR/bench_kernels.json" 2>&1 | grep -v "^W0\|^I0" > "$OUTDIR/bench_kernels.log"
  cat "$OUTDIR/bench_kernels.log" | tail -30
fi
parts=""
for p in gemm ffn gpt2; do has $p && parts="$parts,$p"; done
if [ -n "$parts" ]; then
  timeout 400 $PY benchmarks/bench_sparse_matmul.py $BENCH_ARGS --parts "${parts#,}" --out "$OUTDIR/bench_sparse_matmul.json" 2>&1 \
    | grep -v "^W0\|^I0" > "$OUTDIR/bench_sparse_matmul.log"
  cat "$OUTDIR/bench_sparse_matmul.log" | tail -40
fi

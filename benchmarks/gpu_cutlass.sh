#!/usr/bin/env bash
# The CUTLASS backend's GPU pass in one command: build for sm_90a, golden checks, GEMM/emitter/FFN/step benchmarks.
# Usage (repo root, on a Hopper machine): bash benchmarks/gpu_cutlass.sh [OUTDIR] [STEPS] [BENCH_PARTS]
#   STEPS: comma list of install,build,golden,bench (default: all); BENCH_PARTS: bench_cutlass.py --parts
#   install: pip-installs the wheels carried in .whl/ (nvidia-cutlass for the headers; no network there) to
#   /tmp/site. Prepare them on a machine with pip:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl nvidia-cutlass==4.2.0.0
# Writes at most 5 files into OUTDIR (default $OUT or benchmarks/results/raw).
set -u
OUTDIR=${1:-${OUT:-benchmarks/results/raw}}
STEPS=${2:-install,build,golden,bench}
PARTS=${3:-gemm,emit,ffn,gpt2}
. "$(dirname "$0")/gpu_env.sh"

if has install && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if has build; then
  {
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import jax; print('jax', jax.__version__, jax.devices())"
    $PY -c "from sste_jax.kernels import _toolchain as t; print('nvcc', t.nvcc()); print('cutlass', t.cutlass_includes())"
    nvcc --version | tail -1
    time $PY -c "from sste_jax.kernels import cutlass; print(cutlass.build(force=True))"
  } > "$OUTDIR/cutlass_probe.txt" 2>&1
  cat "$OUTDIR/cutlass_probe.txt"
fi
if has golden; then
  # on-device golden checks (emitter == CUTLASS's compressor byte for byte, product == dot of the pruned
  # matrix, sparse_dense with matmul="cutlass" == XLA) and the CPU-side layout checks
  # (the compile-only test is left out: the build step above compiled the same source)
  timeout 300 $PY -m pytest tests/sste_jax/test_cutlass.py -k "not compiles" -o addopts= --integration -q -rs -p no:cacheprovider \
    > "$OUTDIR/pytest_cutlass.log" 2>&1
  tail -25 "$OUTDIR/pytest_cutlass.log"
fi
if has bench; then
  timeout 420 $PY benchmarks/bench_cutlass.py --parts "$PARTS" --out "$OUTDIR/bench_cutlass.json" 2>&1 \
    | grep -v "^W0\|^I0" > "$OUTDIR/bench_cutlass.log"
  tail -60 "$OUTDIR/bench_cutlass.log"
fi

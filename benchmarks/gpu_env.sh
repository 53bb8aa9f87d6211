# Sourced by the GPU scripts after they set OUTDIR and STEPS: the environment of a GPU pass and `has STEP`.
mkdir -p "$OUTDIR"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
export SSTE_JAX_CACHE=${SSTE_JAX_CACHE:-/tmp/sste_jax_cache}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
has() { [[ ",$STEPS," == *",$1,"* ]]; }

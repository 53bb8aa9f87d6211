#!/usr/bin/env bash
# Builds .venv312 in the repository root: Python 3.12 with sste_jax (editable, no deps) and the third-party models that
# need Python >= 3.12 -- Google's MaxText 0.2.5 and Google DeepMind's gemma 4.0.1 -- plus tunix 0.1.7.
# Idempotent: re-running re-checks every pin and installs nothing new when all are met.
#
#   bash tests/third_party/setup_py312.sh          # then: .venv312/bin/python tests/third_party/maxtext_model.py
#
# Environment: PYTHON312=/path/to/python3.12 to choose the interpreter; VENV312=/path to put the venv elsewhere.
#
# The third-party packages go in with --no-deps plus only the runtime imports their model code needs on CPU:
#   * maxtext 0.2.5 declares no base dependencies (only extras, which pin jax>=0.11.1, flax>=0.12.9 and ~300 packages).
#     Its model code runs on jax 0.10.2 given one shim (see maxtext_model.py). Set DECOUPLE_GCLOUD=TRUE at run time
#     (maxtext.common.gcloud_stub reads it) to stub GCS / JetStream / cloud diagnostics.
#   * tokamax 0.0.17 (imported by maxtext's kernels) requires jax>=0.11.1; with deps it would upgrade jax: --no-deps.
#   * gemma 4.0.1 with deps pulls ~190 packages (kauldron -> tensorflow-cpu, tensorflow-datasets, xmanager,
#     google-cloud-aiplatform, kubernetes, opencv, scikit-learn, scikit-image, mcp, fastmcp, ...). gm.nn needs
#     kauldron (its kauldron.typing imports tensorflow unconditionally), so tensorflow-cpu stays; the rest is left out.
#   * google-tunix 0.1.7: --no-deps; tunix.models.llama3 needs only safetensors, fsspec, huggingface_hub, absl, etils.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV312:-$ROOT/.venv312}"

find_python312() {
  local candidates=()
  [[ -n "${PYTHON312:-}" ]] && candidates+=("$PYTHON312")
  command -v python3.12 >/dev/null 2>&1 && candidates+=("$(command -v python3.12)")
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)"/versions/3.12*/bin/python)
  fi
  candidates+=("$HOME"/.pyenv/versions/3.12*/bin/python /usr/bin/python3.12 /usr/local/bin/python3.12)
  local c
  for c in "${candidates[@]}"; do
    # a pyenv shim exists on PATH even where it refuses to run: try each one
    if [[ -x "$c" ]] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      echo "$c"
      return 0
    fi
  done
  echo "setup_py312.sh: no working Python 3.12 found (set PYTHON312=/path/to/python3.12)" >&2
  return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
  PY="$(find_python312)"
  echo "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# Nothing below may move these.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat >"$CONSTRAINTS" <<'EOF'
jax==0.10.2
jaxlib==0.10.2
flax==0.12.8
numpy==2.5.5
ml_dtypes==0.7.0
EOF

# 1. The project's own stack (as in .venv, Python 3.11), CPU jaxlib.
"${PIP[@]}" -c "$CONSTRAINTS" \
  jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 jaxtyping==0.3.11 \
  beartype==0.23.1 chex==0.1.92 pytest==9.2.0 hypothesis==6.170.27 equinox==0.13.8 numpy==2.5.5 qwix==0.1.8

# 2. sste_jax itself, editable, without its dependencies.
"${PIP[@]}" --no-deps -e "$ROOT"

# 3. The third-party packages, without their declared dependencies.
"${PIP[@]}" --no-deps \
  maxtext==0.2.5 gemma==4.0.1 kauldron==1.4.4 google-tunix==0.1.7 tokamax==0.0.17 aqtp==0.9.0 grain==0.2.18

# 4. What their model code imports at run time (with their own dependencies, jax & co. held by the constraints).
"${PIP[@]}" -c "$CONSTRAINTS" \
  tensorflow-cpu==2.21.0 transformers==5.25.0 safetensors==0.8.0 huggingface_hub==2.4.0 fsspec \
  omegaconf==2.4.0 pydantic==2.14.4 jinja2 pathwaysutils==0.1.13 drjax==0.2.1 tiktoken==0.14.0 sympy==1.14.0 \
  array_record==0.8.6 cloudpickle portpicker einshape==1.0 xprof==2.24.2 tensorboardx \
  clu==0.0.12 ml_collections==1.1.0 immutabledict==4.3.1 typeguard==4.6.1 lark==1.3.1 dialog==1.1.0 \
  sentencepiece==0.2.3 einops==0.8.2 treescope==0.1.10 tqdm "etils[edc,enp,epath,epy,etree]"

# 5. tunix for the project's Python 3.11 venv too (tests/third_party/test_third_party.py imports tunix.models.llama3 there; that
#    venv already has its few imports: safetensors, fsspec, huggingface_hub). SKIP_MAIN_VENV=1 leaves .venv alone.
if [[ -z "${SKIP_MAIN_VENV:-}" && -x "$ROOT/.venv/bin/python" ]]; then
  "$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps google-tunix==0.1.7
fi

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for name in ("jax", "jaxlib", "flax", "numpy", "maxtext", "gemma", "kauldron", "google-tunix", "tensorflow-cpu", "qwix"):
    print(f"{name}=={md.version(name)}")
EOF

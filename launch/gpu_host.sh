#!/usr/bin/env bash
# Run magnet_jax.train / magnet_jax.evaluate on one host with one or more GPUs: a single
# process sees every visible GPU, so no jax.distributed is involved. See docs/launch.md.
set -euo pipefail

readonly SCRIPT_NAME=launch/gpu_host.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_host.sh [OPTIONS] -- {train|evaluate} [ARGS...]

Runs, in the repository root, one process over all visible GPUs:
  VENV/bin/python -m magnet_jax.{train|evaluate} ARGS...
Relative paths (here and in ARGS) are relative to the repository root.

Options:
  --venv DIR           virtual environment to run with (default .venv)
  --install            create the venv if needed and install requirements.txt and jax[CUDA]
  --cuda EXTRA         jax extra for --install: cuda12 (default) or cuda13
  --python PY          interpreter that creates the venv with --install (default python3)
  --gpus LIST          set CUDA_VISIBLE_DEVICES=LIST, e.g. 0,1,2,3 (default: all GPUs)
  --workdir DIR        train: passed as --workdir DIR
  --data DIR           converted data: --config.data.dir DIR (train) or --data DIR (evaluate)
  --dry-run            print the commands (one per line, shell-quoted), run nothing
  -h, --help           this help
EOF
}

VENV=.venv INSTALL=0 CUDA_EXTRA=cuda12 PYTHON=python3 GPUS=''

# This script's own options, for parse_args (launch/common.sh).
parse_option() {
  case $1 in
    --venv) take_value "$@"; VENV=$2 ;;
    --install) INSTALL=1 ;;
    --cuda) take_value "$@"; CUDA_EXTRA=$2 ;;
    --python) take_value "$@"; PYTHON=$2 ;;
    --gpus) take_value "$@"; GPUS=$2 ;;
    *) die_usage "unknown option $1" ;;
  esac
}

parse_args "$@"

check_module
case $CUDA_EXTRA in
  cuda12 | cuda13) ;;
  *) die_usage "--cuda must be cuda12 or cuda13, got '$CUDA_EXTRA'" ;;
esac
if [[ -n $GPUS && ! $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  die_usage "--gpus takes GPU indices like 0,1,2,3, got '$GPUS'"
fi
if [[ $MODULE == evaluate && -n $WORKDIR ]]; then
  die_usage "--workdir is a train option; for evaluate pass --checkpoint DIR after --"
fi

add_command cd "$REPO_ROOT"
if ((INSTALL)); then
  add_command "$PYTHON" -m venv "$VENV"
  add_command "$VENV/bin/pip" install --upgrade pip
  add_command "$VENV/bin/pip" install -r requirements.txt "jax[$CUDA_EXTRA]"
fi

RUN=()
[[ -z $GPUS ]] || RUN+=(env "CUDA_VISIBLE_DEVICES=$GPUS")
RUN+=("$VENV/bin/python" -m "magnet_jax.$MODULE" "${MODULE_ARGS[@]+"${MODULE_ARGS[@]}"}")
[[ -z $WORKDIR ]] || RUN+=(--workdir "$WORKDIR")
if [[ -n $DATA_DIR && $MODULE == train ]]; then
  RUN+=(--config.data.dir "$DATA_DIR")
elif [[ -n $DATA_DIR ]]; then
  RUN+=(--data "$DATA_DIR")
fi
add_command "${RUN[@]}"

run_commands

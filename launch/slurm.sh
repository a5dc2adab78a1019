#!/usr/bin/env bash
# Submit magnet_jax.train / magnet_jax.evaluate as a multi-node SLURM GPU job: the batch
# script goes to sbatch on stdin. See docs/launch.md.
set -euo pipefail

readonly SCRIPT_NAME=launch/slurm.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DASH_VALUE_OPTION=--sbatch-arg
TRACE_FIRST_LINE=1  # the one command is `sbatch <<...` with the script as a heredoc
readonly HEREDOC_END=MAGNET_JAX_SBATCH

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh --nodes N --gpus-per-node G [OPTIONS] -- {train|evaluate} [ARGS...]

Submits a batch job that runs, in the repository root, on every allocated node:
  srun VENV/bin/python -m magnet_jax.{train|evaluate} --distributed ARGS...
jax.distributed.initialize() reads the coordinator, process count and id from srun's SLURM_*
variables. The repository, the venv and every path must be the same on all nodes (shared
filesystem); relative paths are relative to the repository root.

Required:
  --nodes N            number of nodes
  --gpus-per-node G    GPUs per node
Options:
  --per gpu|host       gpu (default): G processes per node, one GPU each;
                       host: 1 process per node that uses all G GPUs
  --partition P        sbatch --partition
  --time T             sbatch --time, e.g. 2-00:00:00
  --account A          sbatch --account
  --job-name NAME      sbatch --job-name (default magnet_jax)
  --cpus-per-task C    CPUs per process, for the input pipeline (sbatch and srun --cpus-per-task)
  --output PATTERN     sbatch --output (default slurm-%x-%j.out, in the repository root)
  --sbatch-arg ARG     extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)
  --venv DIR           virtual environment on the nodes (default .venv)
  --workdir DIR        train: passed as --workdir DIR
  --data DIR           converted data: --config.data.dir DIR (train) or --data DIR (evaluate)
  --dry-run            print the sbatch command with its script, submit nothing
  -h, --help           this help
EOF
}

require_positive_int() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die_usage "$1 must be a positive integer, got '$2'"
}

NODES='' GPUS_PER_NODE='' PER=gpu PARTITION='' TIME_LIMIT='' ACCOUNT='' JOB_NAME=magnet_jax
CPUS_PER_TASK='' OUTPUT='slurm-%x-%j.out' VENV=.venv
SBATCH_ARGS=()

# This script's own options, for parse_args (launch/common.sh).
parse_option() {
  case $1 in
    --nodes) take_value "$@"; NODES=$2 ;;
    --gpus-per-node) take_value "$@"; GPUS_PER_NODE=$2 ;;
    --per) take_value "$@"; PER=$2 ;;
    --partition) take_value "$@"; PARTITION=$2 ;;
    --time) take_value "$@"; TIME_LIMIT=$2 ;;
    --account) take_value "$@"; ACCOUNT=$2 ;;
    --job-name) take_value "$@"; JOB_NAME=$2 ;;
    --cpus-per-task) take_value "$@"; CPUS_PER_TASK=$2 ;;
    --output) take_value "$@"; OUTPUT=$2 ;;
    --sbatch-arg) take_value "$@"; SBATCH_ARGS+=("$2") ;;
    --venv) take_value "$@"; VENV=$2 ;;
    *) die_usage "unknown option $1" ;;
  esac
}

parse_args "$@"

[[ -n $NODES ]] || die_usage "missing --nodes"
[[ -n $GPUS_PER_NODE ]] || die_usage "missing --gpus-per-node"
require_positive_int --nodes "$NODES"
require_positive_int --gpus-per-node "$GPUS_PER_NODE"
[[ -z $CPUS_PER_TASK ]] || require_positive_int --cpus-per-task "$CPUS_PER_TASK"
case $PER in
  gpu | host) ;;
  *) die_usage "--per must be gpu or host, got '$PER'" ;;
esac
check_module
if [[ $MODULE == evaluate && -n $WORKDIR ]]; then
  die_usage "--workdir is a train option; for evaluate pass --checkpoint DIR after --"
fi
# A script line must not end the heredoc early.
for arg in "${MODULE_ARGS[@]+"${MODULE_ARGS[@]}"}" "${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}"; do
  [[ $arg != *$'\n'* ]] || die_usage "arguments must not contain newlines"
done

if [[ $PER == gpu ]]; then TASKS_PER_NODE=$GPUS_PER_NODE; else TASKS_PER_NODE=1; fi

SCRIPT_LINES=(
  '#!/bin/bash'
  "#SBATCH --job-name=$(shell_quote "$JOB_NAME")"
  "#SBATCH --nodes=$NODES"
  "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
)
[[ -z $CPUS_PER_TASK ]] || SCRIPT_LINES+=("#SBATCH --cpus-per-task=$CPUS_PER_TASK")
[[ -z $PARTITION ]] || SCRIPT_LINES+=("#SBATCH --partition=$(shell_quote "$PARTITION")")
[[ -z $TIME_LIMIT ]] || SCRIPT_LINES+=("#SBATCH --time=$(shell_quote "$TIME_LIMIT")")
[[ -z $ACCOUNT ]] || SCRIPT_LINES+=("#SBATCH --account=$(shell_quote "$ACCOUNT")")
SCRIPT_LINES+=(
  "#SBATCH --output=$(shell_quote "$OUTPUT")"
  "#SBATCH --chdir=$(shell_quote "$REPO_ROOT")"
)
for arg in "${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}"; do
  SCRIPT_LINES+=("#SBATCH $(shell_quote "$arg")")
done
SCRIPT_LINES+=('set -euo pipefail')
# shellcheck disable=SC2016  # $SLURM_LOCALID is literal text in the batch script's comments
if [[ $PER == gpu ]]; then
  SCRIPT_LINES+=(
    '# One process per GPU: every task sees all GPUs of its node and jax.distributed.initialize()'
    '# keeps GPU $SLURM_LOCALID for it (hence no --gpus-per-task, which would hide the others).'
  )
else
  local_device_ids=0
  for ((gpu = 1; gpu < GPUS_PER_NODE; gpu++)); do local_device_ids+=",$gpu"; done
  SCRIPT_LINES+=(
    '# One process per node: without this, jax.distributed.initialize() would restrict the'
    '# process to GPU $SLURM_LOCALID, i.e. GPU 0.'
    "export JAX_LOCAL_DEVICE_IDS=$local_device_ids"
  )
fi

SRUN=(srun)
# Repeated for srun: not every SLURM version passes sbatch's --cpus-per-task on to it.
[[ -z $CPUS_PER_TASK ]] || SRUN+=("--cpus-per-task=$CPUS_PER_TASK")
SRUN+=("$VENV/bin/python" -m "magnet_jax.$MODULE" --distributed)
SRUN+=("${MODULE_ARGS[@]+"${MODULE_ARGS[@]}"}")
[[ -z $WORKDIR ]] || SRUN+=(--workdir "$WORKDIR")
if [[ -n $DATA_DIR && $MODULE == train ]]; then
  SRUN+=(--config.data.dir "$DATA_DIR")
elif [[ -n $DATA_DIR ]]; then
  SRUN+=(--data "$DATA_DIR")
fi
SCRIPT_LINES+=("$(quote_words "${SRUN[@]}")")

# A quoted delimiter: the submitting shell expands nothing in the script.
add_shell_line "sbatch <<'$HEREDOC_END'
$(printf '%s\n' "${SCRIPT_LINES[@]}")
$HEREDOC_END"

run_commands

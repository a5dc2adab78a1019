#!/usr/bin/env bash
# Run magnet_jax.train / magnet_jax.evaluate on every worker of a Cloud TPU VM (pod slice).
# See docs/launch.md. `--dry-run` prints the commands instead of running them.
set -euo pipefail

readonly SCRIPT_NAME=launch/tpu_pod.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DASH_VALUE_OPTION=--create-arg
# On every worker, relative to the ssh login's home directory. The code directory is replaced
# on each copy, so nothing that must survive (workdir, data) may live inside it. The tildes
# are for the workers' shells to expand.
# shellcheck disable=SC2088
readonly REMOTE_CODE_DIR='~/magnet_jax' REMOTE_VENV='~/magnet_venv'
readonly REMOTE_TARBALL='magnet_jax.tar.gz'

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE [OPTIONS] -- {train|evaluate} [ARGS...]

Creates the TPU VM NAME if it does not exist, copies this code to every worker, installs it
in a venv there, then runs on every worker at once:
  python -m magnet_jax.{train|evaluate} --distributed ARGS...

Required:
  --name NAME          TPU VM name
  --zone ZONE          zone, e.g. us-west4-a
  --type TYPE          accelerator type, e.g. v5litepod-16 (needed unless --skip-create)
  --version VERSION    TPU software version, e.g. v2-alpha-tpuv5-lite (needed unless --skip-create)
  --workdir DIR        train only: run directory, an absolute path on a filesystem that every
                       worker mounts (Filestore/NFS or gcsfuse); passed as --workdir DIR
Options:
  --data DIR           converted data, an absolute path present on every worker; passed as
                       --config.data.dir DIR (train) or --data DIR (evaluate)
  --project PROJECT    Google Cloud project (default: gcloud's configured project)
  --create-arg ARG     extra argument for `tpu-vm create`, e.g. --create-arg=--spot (repeatable)
  --repo URL           git clone URL on every worker instead of copying `git archive` of this
                       checkout (uncommitted changes are never copied)
  --ref REF            commit, branch or tag to copy or check out (default HEAD)
  --python PY          interpreter for the workers' venv (default python3.11; jax needs >= 3.11)
  --skip-create        use the TPU VM as it is: do not look it up or create it
  --skip-copy          keep the code already on the workers
  --skip-install       keep the venv already on the workers
  --dry-run            print the commands (one per line, shell-quoted), run nothing
  -h, --help           this help
EOF
}

NAME='' ZONE='' ACCELERATOR_TYPE='' TPU_VERSION='' PROJECT=''
REPO_URL='' REF=HEAD PYTHON=python3.11
SKIP_CREATE=0 SKIP_COPY=0 SKIP_INSTALL=0
CREATE_ARGS=()

# This script's own options, for parse_args (launch/common.sh).
parse_option() {
  case $1 in
    --name) take_value "$@"; NAME=$2 ;;
    --zone) take_value "$@"; ZONE=$2 ;;
    --type) take_value "$@"; ACCELERATOR_TYPE=$2 ;;
    --version) take_value "$@"; TPU_VERSION=$2 ;;
    --project) take_value "$@"; PROJECT=$2 ;;
    --create-arg) take_value "$@"; CREATE_ARGS+=("$2") ;;
    --repo) take_value "$@"; REPO_URL=$2 ;;
    --ref) take_value "$@"; REF=$2 ;;
    --python) take_value "$@"; PYTHON=$2 ;;
    --skip-create) SKIP_CREATE=1 ;;
    --skip-copy) SKIP_COPY=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    *) die_usage "unknown option $1" ;;
  esac
}

parse_args "$@"

[[ -n $NAME ]] || die_usage "missing --name"
[[ -n $ZONE ]] || die_usage "missing --zone"
if ((!SKIP_CREATE)); then
  [[ -n $ACCELERATOR_TYPE ]] || die_usage "missing --type (or pass --skip-create)"
  [[ -n $TPU_VERSION ]] || die_usage "missing --version (or pass --skip-create)"
fi
check_module
for arg in "${MODULE_ARGS[@]+"${MODULE_ARGS[@]}"}"; do
  if [[ $arg == --workdir || $arg == --workdir=* ]]; then
    die_usage "pass --workdir to the launcher (before --), which checks it"
  fi
done
if [[ $MODULE == train ]]; then
  [[ -n $WORKDIR ]] || die_usage "train needs --workdir (an absolute path every worker mounts)"
elif [[ -n $WORKDIR ]]; then
  die_usage "--workdir is a train option; for evaluate pass --checkpoint DIR after --"
fi
# A relative path would resolve inside the code directory, which the next copy deletes.
if [[ -n $WORKDIR && $WORKDIR != /* ]]; then
  die_usage "--workdir must be an absolute path, got '$WORKDIR'"
fi
if [[ -n $DATA_DIR && $DATA_DIR != /* ]]; then
  die_usage "--data must be an absolute path, got '$DATA_DIR'"
fi

GCLOUD_LOCATION=(--zone "$ZONE")
[[ -z $PROJECT ]] || GCLOUD_LOCATION+=(--project "$PROJECT")
GCLOUD_TARGET=("$NAME" "${GCLOUD_LOCATION[@]}")

# The same shell command on every worker, in parallel.
add_ssh_all() {
  add_command gcloud compute tpus tpu-vm ssh "${GCLOUD_TARGET[@]}" --worker=all --command "$1"
}

if ((!SKIP_CREATE)); then
  add_shell_line "$(quote_words gcloud compute tpus tpu-vm describe "${GCLOUD_TARGET[@]}") \
>/dev/null 2>&1 || $(quote_words gcloud compute tpus tpu-vm create "${GCLOUD_TARGET[@]}" \
    --accelerator-type "$ACCELERATOR_TYPE" --version "$TPU_VERSION" \
    "${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}")"
fi

if ((!SKIP_COPY)); then
  if [[ -n $REPO_URL ]]; then
    add_ssh_all "rm -rf $REMOTE_CODE_DIR && git clone --quiet $(shell_quote "$REPO_URL") \
$REMOTE_CODE_DIR && git -C $REMOTE_CODE_DIR checkout --quiet $(shell_quote "$REF")"
  else
    local_tarball="/tmp/magnet_jax-$NAME.tar.gz"
    add_command git -C "$REPO_ROOT" archive --format=tar.gz --output="$local_tarball" "$REF"
    add_command gcloud compute tpus tpu-vm scp "$local_tarball" "$NAME:$REMOTE_TARBALL" \
      "${GCLOUD_LOCATION[@]}" --worker=all
    add_ssh_all "rm -rf $REMOTE_CODE_DIR && mkdir -p $REMOTE_CODE_DIR \
&& tar -xzf ~/$REMOTE_TARBALL -C $REMOTE_CODE_DIR"
  fi
fi

if ((!SKIP_INSTALL)); then
  python_quoted=$(shell_quote "$PYTHON")
  # Stock images may lack this Python or its venv module (Debian packages it apart): on a
  # failed venv creation, install both with apt and try once more.
  add_ssh_all "{ $python_quoted -m venv $REMOTE_VENV || { sudo apt-get update -q \
&& sudo apt-get install -y -q $python_quoted $(shell_quote "$PYTHON-venv") \
&& $python_quoted -m venv --clear $REMOTE_VENV; }; } \
&& $REMOTE_VENV/bin/pip install -q --upgrade pip \
&& $REMOTE_VENV/bin/pip install -q -r $REMOTE_CODE_DIR/requirements.txt \"jax[tpu]\""
fi

RUN_ARGS=(-m "magnet_jax.$MODULE" --distributed "${MODULE_ARGS[@]+"${MODULE_ARGS[@]}"}")
[[ -z $WORKDIR ]] || RUN_ARGS+=(--workdir "$WORKDIR")
if [[ -n $DATA_DIR && $MODULE == train ]]; then
  RUN_ARGS+=(--config.data.dir "$DATA_DIR")
elif [[ -n $DATA_DIR ]]; then
  RUN_ARGS+=(--data "$DATA_DIR")
fi
add_ssh_all "cd $REMOTE_CODE_DIR && $REMOTE_VENV/bin/python $(quote_words "${RUN_ARGS[@]}")"

run_commands

# shellcheck shell=bash
# Helpers shared by launch/tpu_pod.sh, launch/gpu_host.sh and launch/slurm.sh; not meant to be
# run on its own. Each script sets SCRIPT_NAME, sources this file, defines usage and
# parse_option, calls parse_args "$@" and check_module, adds its commands and calls run_commands.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT

# The one option (if any) whose value may itself start with --, e.g. --create-arg=--spot.
DASH_VALUE_OPTION=''
# 1: echo only the first line of each command when running it (a heredoc's body is not echoed).
TRACE_FIRST_LINE=0

die_usage() {
  printf '%s: error: %s (see --help)\n' "$SCRIPT_NAME" "$1" >&2
  exit 2
}

# POSIX single quotes where needed, so printed commands paste back into a shell unchanged.
shell_quote() {
  local word=$1
  if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

quote_words() {
  local quoted='' word
  for word in "$@"; do
    quoted+="${quoted:+ }$(shell_quote "$word")"
  done
  printf '%s' "$quoted"
}

COMMANDS=()
add_command() { COMMANDS+=("$(quote_words "$@")"); }
add_shell_line() { COMMANDS+=("$1"); }  # already quoted; for `||`, a heredoc and the like

run_commands() {
  local command
  if ((DRY_RUN)); then
    printf '%s\n' "${COMMANDS[@]}"
    return
  fi
  for command in "${COMMANDS[@]}"; do
    if ((TRACE_FIRST_LINE)); then
      printf '+ %s\n' "${command%%$'\n'*}" >&2
    else
      printf '+ %s\n' "$command" >&2
    fi
    eval "$command"
  done
}

# The options every script has; parse_args sets them.
WORKDIR='' DATA_DIR='' DRY_RUN=0 MODULE='' MODULE_ARGS=()

# parse_args "$@": the script's command line. --opt=value is split in two. --workdir, --data,
# --dry-run, -h/--help and `-- MODULE ARGS...` are handled here; any other option goes to the
# script's `parse_option OPTION [NEXT...]`, which sets it, calls take_value if it takes a
# value, and calls die_usage if it does not know the option.
parse_args() {
  while (($#)); do
    if [[ $1 == --*=* ]]; then
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
    fi
    OPTION_WORDS=1
    case $1 in
      --workdir) take_value "$@"; WORKDIR=$2 ;;
      --data) take_value "$@"; DATA_DIR=$2 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --)
        shift
        (($#)) || die_usage "nothing after --: expected train or evaluate"
        MODULE=$1
        MODULE_ARGS=("${@:2}")
        return
        ;;
      *) parse_option "$@" ;;
    esac
    shift "$OPTION_WORDS"
  done
}

# take_value OPTION [NEXT...]: the option's value is there and is not the next option; parse_args
# moves past both.
take_value() {
  (($# >= 2)) || die_usage "$1 needs a value"
  [[ $2 != --* || $1 == "$DASH_VALUE_OPTION" ]] || die_usage "$1 needs a value, got option $2"
  OPTION_WORDS=2
}

check_module() {
  local arg
  [[ -n $MODULE ]] || die_usage "missing -- train|evaluate [ARGS...]"
  case $MODULE in
    train | evaluate) ;;
    *) die_usage "unknown command '$MODULE' after --: expected train or evaluate" ;;
  esac
  # Neither module has this flag; after -- it would mean a real launch the user did not want.
  for arg in "${MODULE_ARGS[@]+"${MODULE_ARGS[@]}"}"; do
    [[ $arg != --dry-run ]] || die_usage "--dry-run must come before --"
  done
}

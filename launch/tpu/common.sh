# Shared helpers of the launch/tpu scripts (sourced, not run).
#
# Every script parses `--key=value` / `--key value` flags into FLAG_<key> variables, refuses unknown flags with
# its usage text, and runs gcloud through `run`, which with --dry_run prints the exact command line (shell-quoted,
# one per line, prefixed "+ ") instead of running it.

# usage_error MESSAGE: prints the message and the calling script's usage (from $USAGE) to stderr, exits 2.
usage_error() {
  printf 'error: %s\n\n%s\n' "$1" "$USAGE" >&2
  exit 2
}

# parse_flags "known flag names (space separated)" "$@": sets FLAG_<name> for each flag given; boolean flags
# (listed in $BOOL_FLAGS) take no value. Arguments after a bare `--` land in the array EXTRA_ARGS.
parse_flags() {
  local known=" $1 " bools=" ${BOOL_FLAGS:-} " arg key value
  shift
  EXTRA_ARGS=()
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --) EXTRA_ARGS=("$@"); break ;;
      -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
      --*=*) key=${arg%%=*}; key=${key#--}; value=${arg#*=} ;;
      --*)
        key=${arg#--}
        if [[ $bools == *" $key "* ]]; then
          value=true
        elif (($#)) && [[ $1 != --* ]]; then
          value=$1
          shift
        else
          usage_error "flag --$key needs a value"
        fi
        ;;
      *) usage_error "unexpected argument '$arg' (flags are --name=value; pass train flags after --)" ;;
    esac
    [[ $known == *" $key "* || $bools == *" $key "* ]] || usage_error "unknown flag --$key"
    [[ $bools == *" $key "* && $value != true && $value != false ]] && usage_error "--$key takes true or false, got '$value'"
    printf -v "FLAG_${key}" '%s' "$value"
  done
}

# require NAME...: fails with a usage error unless every named flag was given (non-empty).
require() {
  local name var
  for name in "$@"; do
    var="FLAG_${name}"
    [[ -n ${!var:-} ]] || usage_error "--$name is required"
  done
}

# check_common: validates --name, --zone and --project (when given).
check_common() {
  require name zone
  [[ $FLAG_name =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    usage_error "--name='$FLAG_name': lowercase letters, digits and hyphens, starting with a letter (max 63)"
  [[ $FLAG_zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || usage_error "--zone='$FLAG_zone' is not a zone like us-east5-a"
  if [[ -n ${FLAG_project:-} && ! $FLAG_project =~ ^[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]]; then
    usage_error "--project='$FLAG_project' is not a project id"
  fi
}

# check_slices: validates --slices (default 1) and sets SLICES and NODES: the TPU VM names, NAME for one slice,
# NAME-0 .. NAME-(S-1) for a multi-slice queued resource (gcloud's --node-prefix naming).
check_slices() {
  SLICES=${FLAG_slices:-1}
  [[ $SLICES =~ ^[1-9][0-9]*$ ]] || usage_error "--slices='$SLICES' must be a positive integer"
  NODES=()
  if ((SLICES == 1)); then
    NODES=("$FLAG_name")
  else
    local i
    ((${#FLAG_name} + 1 + ${#SLICES} <= 63)) ||
      usage_error "--name='$FLAG_name' is too long for $SLICES slices (NAME-<index> must fit 63 characters)"
    for ((i = 0; i < SLICES; i++)); do NODES+=("$FLAG_name-$i"); done
  fi
}

# location_args: sets LOCATION_ARGS to the --zone/--project flags every gcloud call takes.
location_args() {
  LOCATION_ARGS=("--zone=$FLAG_zone")
  [[ -n ${FLAG_project:-} ]] && LOCATION_ARGS+=("--project=$FLAG_project")
  return 0
}

# quote WORD: prints WORD as one shell word: as it is when it is plain, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# quote_all WORD...: prints the words shell-quoted and joined by spaces.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# run CMD...: runs the command, or with --dry_run prints it shell-quoted after "+ " (one line).
run() {
  if [[ ${FLAG_dry_run:-false} == true ]]; then
    printf '+ %s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

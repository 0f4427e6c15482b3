# Sourced by the launch/*.sh scripts: run a launcher command and, if it fails, repeat the tool's
# own one-line messages ("PROG: error: ...", "PROG: rank N: error: ...", "PROG: stopped by ...")
# after everything the launcher printed (its banner, per-rank tracebacks, "exits with return code"),
# so the cause is the last thing on the screen. The command's exit status is kept.

run_reporting_errors() {
  local log status
  log=$(mktemp "${TMPDIR:-/tmp}/launch-stderr.XXXXXX")
  set +e
  { "$@" 2>&1 1>&3 3>&- | tee "$log" >&2; status=${PIPESTATUS[0]}; } 3>&1
  set -e
  if [ "$status" -ne 0 ]; then
    local messages
    messages=$(grep -E '^[A-Za-z0-9_.-]+: (rank [0-9]+: )?(error|stopped by|lost contact)' "$log" | awk '!seen[$0]++')
    if [ -n "$messages" ]; then
      printf '%s\n' "---- the job failed (exit status $status); the tool said:" "$messages" >&2
    fi
  fi
  rm -f "$log"
  return "$status"
}

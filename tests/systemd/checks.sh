#!/bin/sh
# Checks run inside the throw-away systemd by tests/test_systemd.py (run-under-systemd.sh --post).
# Each prints "CHECK PASS: ..." or "CHECK FAIL: ..." and exits non-zero on failure. Every wait
# has a deadline. Usage: checks.sh STEP PORT BUILDING
set -u
step="$1"; port="$2"; building="$3"
unit=nilmd.service
# redis-cli reads the password from REDISCLI_AUTH: not on a command line that `ps` shows.
REDISCLI_AUTH="$(cat /etc/nilmd/redis-password 2>/dev/null || true)"; export REDISCLI_AUTH
rcli() { redis-cli --no-auth-warning -h 127.0.0.1 -p "$port" "$@"; }
status_field() { rcli hget "nilm:$building:status" "$1"; }
pass() { echo "CHECK PASS: $*"; }
fail() { echo "CHECK FAIL: $*"; exit 1; }
# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds
wait_until() {
  limit="$1"; what="$2"; shift 2
  end=$(( $(date +%s) + limit ))
  while [ "$(date +%s)" -lt "$end" ]; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  fail "timed out after ${limit}s waiting for: $what"
}
journal() { journalctl --no-pager -o cat -u "$unit" "$@"; }

case "$step" in
journal)
  # structured fields (JournalHandler) or priority prefixes (plain stderr): $4 says which
  mode="$4"
  # the whole journal first: a pipe whose grep -q stops reading early fails under pipefail
  # (the tool's own --expect-log did, once the journal outgrew the pipe)
  log="$(journal)"
  printf '%s\n' "$log" | grep -q 'models loaded: 11 of 11' || fail "no 'models loaded' line in journalctl -u nilmd"
  printf '%s\n' "$log" | grep -q 'ready: ' || fail "no 'ready:' line in journalctl -u nilmd"
  # onnxruntime's telemetry is off (nilmd.models.onnx_backend.runtime): it writes no device id and
  # no warning about the one it could not persist
  printf '%s\n' "$log" | grep -q 'telemetry' && fail "onnxruntime's telemetry spoke: $(printf '%s\n' "$log" | grep telemetry | head -1)"
  journal -p err | grep -q 'models loaded' && fail "an info line was logged at priority err or worse"
  if [ "$mode" = fields ]; then
    journal NILMD_ROLE=inference | grep -q 'models loaded' || fail "journalctl NILMD_ROLE=inference finds nothing"
    journal NILMD_ROLE=reader | grep -q 'models loaded' && fail "NILMD_ROLE=reader matched an inference line"
    journal "NILMD_BUILDING=$building" | grep -q 'ready' || fail "journalctl NILMD_BUILDING=$building finds nothing"
    pass "journal fields NILMD_ROLE and NILMD_BUILDING are queryable"
  fi
  journal | grep -q '^<[0-9]>' && fail "raw <N> prefixes reached the journal text"
  pass "log lines in journalctl -u nilmd at the right priorities"
  ;;
reload)
  before="$(status_field pid_inference)"
  n0="$(journal | grep -c 'reloaded')"
  systemctl reload "$unit" || fail "systemctl reload failed"
  wait_until 60 "a 'reloaded' line after systemctl reload" sh -c "[ \$(journalctl --no-pager -o cat -u $unit | grep -c reloaded) -gt $n0 ]"
  wait_until 30 "ActiveState=active after the reload" sh -c "[ \$(systemctl show -p ActiveState --value $unit) = active ]"
  [ "$(status_field pid_inference)" = "$before" ] || fail "the inference process was restarted by a reload"
  pass "systemctl reload: checkpoints reloaded in the running inference process (pid $before)"
  ;;
kill-inference)
  old="$(status_field pid_inference)"
  [ -n "$old" ] && [ "$old" -gt 0 ] && kill -0 "$old" || fail "no live inference pid in the status hash ($old)"
  main="$(systemctl show -p MainPID --value "$unit")"
  kill -KILL "$old"
  wait_until 60 "a new inference pid in the status hash" sh -c \
    "p=\$(REDISCLI_AUTH='$REDISCLI_AUTH' redis-cli --no-auth-warning -p $port hget nilm:$building:status pid_inference); [ -n \"\$p\" ] && [ \"\$p\" != 0 ] && [ \"\$p\" != $old ] && kill -0 \$p"
  new="$(status_field pid_inference)"
  wait_until 60 "state running again" sh -c \
    "[ \"\$(REDISCLI_AUTH='$REDISCLI_AUTH' redis-cli --no-auth-warning -p $port hget nilm:$building:status state)\" = running ]"
  [ "$(systemctl show -p MainPID --value "$unit")" = "$main" ] || fail "the supervisor was restarted too"
  journal -p err | grep -q "inference process (pid $old) died" || fail "no error line about the killed child"
  pass "SIGKILLed inference pid $old came back as pid $new under the same supervisor $main"
  ;;
hang-inference)
  # a hung (SIGSTOPped) inference process: the supervisor replaces it itself, before the
  # watchdog can expire; systemd does not restart the service
  old="$(status_field pid_inference)"
  main="$(systemctl show -p MainPID --value "$unit")"; nr="$(systemctl show -p NRestarts --value "$unit")"
  [ -n "$old" ] && [ "$old" -gt 0 ] && kill -0 "$old" || fail "no live inference pid in the status hash ($old)"
  kill -STOP "$old"
  wait_until 40 "the supervisor to replace the hung inference pid $old" sh -c \
    "p=\$(REDISCLI_AUTH='$REDISCLI_AUTH' redis-cli --no-auth-warning -p $port hget nilm:$building:status pid_inference); [ -n \"\$p\" ] && [ \"\$p\" != 0 ] && [ \"\$p\" != $old ] && kill -0 \$p"
  new="$(status_field pid_inference)"
  sleep 8  # past the earliest moment the watchdog could have expired
  [ "$(systemctl show -p MainPID --value "$unit")" = "$main" ] && [ "$(systemctl show -p NRestarts --value "$unit")" = "$nr" ] ||
    fail "systemd restarted the service (NRestarts $nr -> $(systemctl show -p NRestarts --value "$unit")) instead of the supervisor replacing the child"
  journal -p err | grep -q "inference process (pid $old) sent no heartbeat" || fail "no error line about the hung child"
  pass "hung inference pid $old replaced by the supervisor (pid $new) before the watchdog could expire"
  ;;
secrets)
  secret="$(cat /etc/nilmd/redis-password)"
  [ -n "$secret" ] || fail "no test password"
  journal | grep -qF "$secret" && fail "the Redis password is in the journal"
  main="$(systemctl show -p MainPID --value "$unit")"
  for p in $main $(pgrep -P "$main"); do
    tr '\0' ' ' < "/proc/$p/cmdline" | grep -qF "$secret" && fail "the Redis password is on pid $p's command line"
    tr '\0' '\n' < "/proc/$p/environ" | grep -qF "$secret" && fail "the Redis password is in pid $p's environment"
  done
  rcli hgetall "nilm:$building:status" | grep -qF "$secret" && fail "the Redis password is in the status hash"
  pass "the password came through LoadCredential and shows in no log, command line, environment or status"
  ;;
stop)
  [ -e "/run/nilmd/nilmd-$building.ring" ] || fail "no ring in /run/nilmd while running: $(ls -la /run/nilmd 2>&1)"
  systemctl stop "$unit" || fail "systemctl stop failed"
  [ "$(systemctl show -p ActiveState --value "$unit")" = inactive ] || fail "not inactive after stop"
  [ "$(status_field state)" = stopped ] || fail "status hash does not say stopped"
  left="$(ls -A /run/nilmd 2>/dev/null) $(find /dev/shm -maxdepth 1 -name 'nilmd*' 2>/dev/null)"
  [ -z "$(echo "$left" | tr -d ' ')" ] && [ ! -e /run/nilmd ] || fail "shared memory left after stop: $left"
  pass "stopped: no shared memory left in /run/nilmd or /dev/shm"
  ;;
*) fail "unknown step $step" ;;
esac

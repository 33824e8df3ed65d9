#!/bin/sh
# Steps of tests/test_systemd_template.py, run inside the throw-away systemd (run-under-systemd.sh
# --pre/--post). The test binds its files at /srv/nilmd-test: nilmd@.service, the test drop-in,
# nilmd.env (shared), B.env, redis-password (shared), B-redis-password, checkpoints/.
# Each step prints "CHECK PASS: ..." or "CHECK FAIL: ..." and exits non-zero on failure; every wait
# has a deadline. Usage: instance-checks.sh STEP PORT A B
set -u
step="$1"; port="$2"; a="$3"; b="$4"
srv=/srv/nilmd-test
units=/etc/systemd/system
REDISCLI_AUTH="$(cat /etc/nilmd/redis-password 2>/dev/null || true)"; export REDISCLI_AUTH
rcli() { redis-cli --no-auth-warning -h 127.0.0.1 -p "$port" "$@"; }
field() { rcli hget "nilm:$1:status" "$2"; }
prop() { systemctl show -p "$2" --value "nilmd@$1.service"; }
pass() { echo "CHECK PASS: $*"; }
fail() { echo "CHECK FAIL: $*"; exit 1; }
wait_until() {  # SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s until it succeeds
  limit="$1"; what="$2"; shift 2; end=$(( $(date +%s) + limit ))
  while [ "$(date +%s)" -lt "$end" ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  fail "timed out after ${limit}s waiting for: $what"
}
received_above() { n="$(field "$1" samples_received)"; [ -n "$n" ] && [ "$n" -gt "$2" ]; }
mode() { stat -c '%U:%G %a' "$1" 2>&1; }

case "$step" in
setup)
  # The box as install.sh leaves it, plus the operator's files for instance B. The tool installed
  # a copy of the template under A's name (it runs one unit file): replace it with the template
  # itself, so that both instances come from nilmd@.service, and move the test drop-in to
  # nilmd@.service.d/ (every instance).
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nilmd || fail "useradd"
  install -d -m 0750 -g nilmd /etc/nilmd /etc/nilmd/"$b" &&
    install -m 0640 -g nilmd "$srv/redis-password" /etc/nilmd/redis-password &&
    install -m 0640 -g nilmd "$srv/nilmd.env" /etc/nilmd/nilmd.env &&
    install -m 0640 -g nilmd "$srv/B.env" "/etc/nilmd/$b.env" &&
    install -m 0600 "$srv/B-redis-password" "/etc/nilmd/$b/redis-password" || fail "config files"
  rm -f "$units/nilmd@$a.service" && install -m 0644 "$srv/nilmd@.service" "$units/nilmd@.service" &&
    mv "$units/nilmd@$a.service.d" "$units/nilmd@.service.d" &&
    install -d "$units/nilmd@$b.service.d" &&
    printf '[Service]\nLoadCredential=redis-password:/etc/nilmd/%s/redis-password\n' "$b" \
      > "$units/nilmd@$b.service.d/credentials.conf" && systemctl daemon-reload || fail "installing the template"
  [ "$(systemctl show -p FragmentPath --value "nilmd@$a.service")" = "$units/nilmd@.service" ] || fail "A is not loaded from the template"
  pass "template installed; shared nilmd.env, $b.env and $b's own password in place"
  ;;
both)
  # A was started by the tool; B the way an operator would. Type=notify: start returns once
  # READY=1 came (or fails).
  timeout 120 systemctl start "nilmd@$b.service" ||
    fail "systemctl start nilmd@$b failed: $(systemctl status --no-pager -n 20 "nilmd@$b.service" 2>&1)"
  for i in "$a" "$b"; do
    [ "$(prop "$i" ActiveState)" = active ] || fail "nilmd@$i is not active"
    [ "$(prop "$i" FragmentPath)" = "$units/nilmd@.service" ] || fail "nilmd@$i is not loaded from the template"
    pid="$(prop "$i" MainPID)"
    # the building id, runtime and state directory on the command line won over the shared
    # nilmd.env's BUILDING_ID, NILMD_RUNTIME_DIR and NILMD_STATE_DIR
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "--building-id $i --runtime-dir /run/nilmd/$i --state-dir /var/lib/nilmd/$i" ||
      fail "nilmd@$i runs $(tr '\0' ' ' < "/proc/$pid/cmdline")"
    [ "$(mode "/run/nilmd/$i")" = "nilmd:nilmd 700" ] && [ "$(mode "/var/lib/nilmd/$i")" = "nilmd:nilmd 700" ] ||
      fail "nilmd@$i directories: /run/nilmd/$i $(mode "/run/nilmd/$i"), /var/lib/nilmd/$i $(mode "/var/lib/nilmd/$i")"
    [ "$(ls /run/nilmd/"$i")" = "$(printf 'nilmd-%s.ctl\nnilmd-%s.lock\nnilmd-%s.ring' "$i" "$i" "$i")" ] ||
      fail "/run/nilmd/$i holds: $(ls /run/nilmd/"$i" | tr '\n' ' ')"
    wait_until 60 "samples counted in nilm:$i:status" received_above "$i" 0
    [ "$(field "$i" building_id)" = "$i" ] && [ "$(field "$i" pid_supervisor)" = "$pid" ] ||
      fail "nilm:$i:status is not nilmd@$i's: building_id=$(field "$i" building_id) pid_supervisor=$(field "$i" pid_supervisor), MainPID $pid"
    log="$(journalctl --no-pager -o cat -u "nilmd@$i.service")"
    printf '%s\n' "$log" | grep -q 'models loaded: 11 of 11' || fail "nilmd@$i loaded no models"
    printf '%s\n' "$log" | grep -q 'ready: ' || fail "nilmd@$i logged no 'ready:' line"
    # for docs/PERFORMANCE.md: what each instance costs (PSS shares torch's pages among both instances;
    # no awk here: the container's /etc has no alternatives)
    kb=0
    for p in $pid $(pgrep -P "$pid"); do
      v="$(sed -n 's/^Pss: *\([0-9]*\) kB$/\1/p' "/proc/$p/smaps_rollup" 2>/dev/null)"; kb=$(( kb + ${v:-0} ))
    done
    pss=$(( kb / 1024 ))
    echo "nilmd@$i: MainPID $pid, $(field "$i" state), $(field "$i" samples_received) samples, RSS $(field "$i" memory_total_mb) MB, PSS $pss MB"
  done
  # B read its own settings file (an ACL user that only its own password opens) and its own
  # credential, not the shared one
  [ "$(cat "/run/credentials/nilmd@$b.service/redis-password")" = "$(cat "/etc/nilmd/$b/redis-password")" ] ||
    fail "nilmd@$b did not get its own redis-password credential"
  rcli client list | grep -q "user=nilmd-$b " || fail "no Redis connection as user nilmd-$b: $(rcli client list)"
  journalctl --no-pager -o cat SYSLOG_IDENTIFIER="nilmd@$b" | grep -q "models loaded" || fail "no journal lines tagged nilmd@$b"
  pass "nilmd@$a and nilmd@$b active (READY) from one template: own directories, status hashes, settings and password"
  ;;
stop-one)
  pid_b="$(prop "$b" MainPID)"
  systemctl stop "nilmd@$a.service" || fail "systemctl stop nilmd@$a failed"
  [ "$(prop "$a" ActiveState)" = inactive ] && [ "$(field "$a" state)" = stopped ] || fail "nilmd@$a did not stop cleanly"
  [ ! -e "/run/nilmd/$a" ] || fail "/run/nilmd/$a is left after the stop: $(ls -A "/run/nilmd/$a")"
  [ -f "/var/lib/nilmd/$a/nilmd-$a.snapshot" ] || fail "no snapshot in /var/lib/nilmd/$a: $(ls -A "/var/lib/nilmd/$a")"
  [ "$(prop "$b" ActiveState)" = active ] && [ "$(prop "$b" MainPID)" = "$pid_b" ] && [ "$(prop "$b" NRestarts)" = 0 ] ||
    fail "stopping nilmd@$a disturbed nilmd@$b: $(systemctl show -p ActiveState -p MainPID -p NRestarts "nilmd@$b.service" | tr '\n' ' ')"
  [ "$(ls /run/nilmd/"$b" | wc -l)" = 3 ] || fail "/run/nilmd/$b lost files: $(ls -A /run/nilmd/"$b")"
  n="$(field "$b" samples_received)"
  wait_until 30 "nilmd@$b to go on counting samples after nilmd@$a stopped" received_above "$b" "$n"
  [ "$(field "$b" state)" != stopped ] || fail "nilm:$b:status says stopped"
  pass "stopped nilmd@$a (runtime directory gone, snapshot kept); nilmd@$b runs on untouched (pid $pid_b)"
  ;;
escaped)
  # systemd-escape turns '-' into \x2d; %i passes the instance name as written, which the daemon
  # refuses as a building id: exit 2, not restarted, one clear line.
  name="$(systemd-escape "x-$b")"
  timeout 60 systemctl start "nilmd@$name.service" 2>/dev/null && fail "nilmd@$name started"
  wait_until 20 "nilmd@$name to fail" sh -c "[ \"\$(systemctl show -p ActiveState --value 'nilmd@$name.service')\" = failed ]"
  [ "$(prop "$name" ExecMainStatus)" = 2 ] && [ "$(prop "$name" NRestarts)" = 0 ] ||
    fail "nilmd@$name: exit $(prop "$name" ExecMainStatus), restarts $(prop "$name" NRestarts)"
  journalctl --no-pager -o cat -u "nilmd@$name.service" | grep -q -- "--building-id: 'x.*must be 1-64 letters" ||
    fail "no clear line for the escaped name: $(journalctl --no-pager -o cat -u "nilmd@$name.service" | tail -5)"
  systemctl reset-failed "nilmd@$name.service"
  pass "an escaped instance name (nilmd@$name) fails at once with exit 2 and says why"
  ;;
stop-other)
  systemctl stop "nilmd@$b.service" || fail "systemctl stop nilmd@$b failed"
  [ ! -e "/run/nilmd/$b" ] && [ -f "/var/lib/nilmd/$b/nilmd-$b.snapshot" ] || fail "after stopping nilmd@$b: $(ls -AR /run/nilmd /var/lib/nilmd)"
  pass "stopped nilmd@$b: runtime directory gone, snapshot kept"
  ;;
*) fail "unknown step $step" ;;
esac

#!/bin/bash
# Steps of tests/test_install.py, run inside a throw-away systemd container (run-under-systemd.sh
# --pre) whose /etc, /opt and /var start empty. Each runs scripts/install.sh and checks what it
# did, printing "CHECK PASS: ..." or "CHECK FAIL: ..." (and exiting non-zero, which stops the run).
# Usage: install-checks.sh STEP SOURCE_TREE CHECKPOINT_DIR [REDIS_PORT BUILDING]
set -u
step="$1"; src="$2"; ckpt="$3"; port="${4:-}"; building="${5:-}"
installer="$src/scripts/install.sh"
out=/run/nilmd-install-test.out
pass() { echo "CHECK PASS: $*"; }
fail() { echo "CHECK FAIL: $*"; exit 1; }
# run the installer with the given options, show its output, fail on a non-zero exit
inst() {
  echo "\$ install.sh $*"
  bash "$installer" "$@" >"$out" 2>&1; rc=$?
  sed 's/^/  | /' "$out"
  [ "$rc" = 0 ] || fail "install.sh $* exited with $rc"
}
perm() { [ "$(stat -c '%U:%G %a' "$1" 2>/dev/null)" = "$2" ] || fail "$1 is $(stat -c '%U:%G %a' "$1" 2>&1), expected $2"; }
wait_until() {  # SECONDS WHAT COMMAND...
  limit="$1"; what="$2"; shift 2; end=$(( $(date +%s) + limit ))
  while [ "$(date +%s)" -lt "$end" ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  fail "timed out after ${limit}s waiting for: $what"
}
snapshot() { find /opt /etc /var/lib -xdev \( -path /opt/wheels -o -path /opt/pypi -o -path /opt/pypi-more \) -prune -o -print 2>/dev/null | sort; }

case "$step" in
dry-run)
  before="$(snapshot; getent passwd nilmd)"
  inst --dry-run --checkpoints "$ckpt"
  grep -q "^dry run: [0-9]* changes would be made; nothing was changed" "$out" || fail "no dry-run summary"
  grep -q "would: create system user nilmd" "$out" || fail "dry run does not mention the user"
  [ "$before" = "$(snapshot; getent passwd nilmd)" ] || fail "--dry-run changed the file system or the users"
  pass "--dry-run lists the actions and changes nothing"
  ;;
install)
  inst --checkpoints "$ckpt"
  grep -q "^done: [0-9]* changes" "$out" || fail "no summary line"
  getent passwd nilmd | grep -q ':/usr/sbin/nologin$' || fail "no system user nilmd with nologin"
  perm /opt/nilmd "root:root 755"; perm /etc/nilmd "root:nilmd 750"; perm /etc/nilmd/nilmd.env "root:nilmd 640"
  perm /var/lib/nilmd "nilmd:nilmd 700"; perm /var/lib/nilmd/checkpoints "root:nilmd 750"
  [ "$(ls /var/lib/nilmd/checkpoints/wavenilm_v3_SOTA_*_best.pth | wc -l)" = 11 ] || fail "not 11 checkpoints"
  for f in /var/lib/nilmd/checkpoints/*; do perm "$f" "root:nilmd 640"; done
  cmp -s "$src/systemd/nilmd.env" /etc/nilmd/nilmd.env || fail "nilmd.env is not the example"
  cmp -s "$src/systemd/nilmd.service" /etc/systemd/system/nilmd.service || fail "the unit was not installed"
  cmp -s "$src/systemd/nilmd@.service" /etc/systemd/system/nilmd@.service || fail "the template was not installed"
  [ "$(systemctl show -p FragmentPath --value nilmd.service)" = /etc/systemd/system/nilmd.service ] || fail "systemd does not know the unit (no daemon-reload?)"
  [ -x /opt/nilmd/venv/bin/nilmd ] || fail "no /opt/nilmd/venv/bin/nilmd"
  /opt/nilmd/venv/bin/nilmd --help >/dev/null || fail "the installed nilmd does not run"
  /opt/nilmd/venv/bin/python -c 'import torch, sys; sys.exit(torch.version.cuda is not None)' || fail "torch is missing or a CUDA build on a CPU box"
  /opt/nilmd/venv/bin/pip list 2>/dev/null | grep -qi '^nvidia-' && fail "CUDA runtime wheels were installed on a CPU box"
  if python3 -c 'import systemd.journal' 2>/dev/null; then
    /opt/nilmd/venv/bin/python -c 'import systemd.journal' || fail "systemd-python is not importable in the venv"
  fi
  systemctl is-active --quiet nilmd && fail "the service started without --enable"
  pass "installed from scratch: user, directories and modes, venv with nilmd and a CPU torch, checkpoints, config, unit"
  ;;
again)
  inst --checkpoints "$ckpt" "${@:4}"
  grep -q "^nothing changed" "$out" || fail "a second run changed something: $(grep -E 'done:|would:' "$out" | head -5)"
  pass "second run: nothing changed"
  ;;
cuda-guard)
  # $4 holds only a CUDA-tagged torch 2.13.1 (a metadata-only wheel the test wrote): asked for
  # 2.13.1 on this CPU box, the installer must refuse it before installing anything.
  echo "\$ install.sh --torch-version 2.13.1 (only a CUDA build available: expected to fail)"
  PIP_FIND_LINKS="$PIP_FIND_LINKS $4" PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=5 \
    bash "$installer" --torch-version 2.13.1 --checkpoints "$ckpt" >"$out" 2>&1 && fail "the installer accepted a CUDA build"
  sed 's/^/  | /' "$out"
  grep -q "no cpu build of torch 2.13.1 found" "$out" || fail "no clear refusal"
  grep -q "pip's configuration: cuda" "$out" || fail "the refusal does not say what pip resolved"
  [ "$(/opt/nilmd/venv/bin/python -c 'import torch; print(torch.__version__)')" = 2.13.0+cpu ] || fail "torch changed"
  pass "a CUDA build offered on a CPU box is refused before anything is installed"
  ;;
enable)
  # the operator's settings: never overwritten by the installer
  printf 'REDIS_HOST=127.0.0.1\nREDIS_PORT=%s\nBUILDING_ID=%s\nWINDOW_SIZE=256\nINFERENCE_INTERVAL=16\nNILMD_RING_CAPACITY=1024\nNILMD_THREADS=1\n' \
    "$port" "$building" >> /etc/nilmd/nilmd.env
  sum="$(sha256sum /etc/nilmd/nilmd.env)"
  # First without checkpoints: the daemon exits 78 (EX_CONFIG), which the unit does not restart
  # (RestartPreventExitStatus=), and the installer fails saying why.
  mv /var/lib/nilmd/checkpoints /run/ckpt-aside && install -d -m 0750 -g nilmd /var/lib/nilmd/checkpoints
  echo "\$ install.sh --enable --checkpoints /nonexistent (expected to fail)"
  bash "$installer" --enable --checkpoints /nonexistent >"$out" 2>&1 && fail "--enable without checkpoints succeeded"
  sed 's/^/  | /' "$out"
  grep -q "ERROR: failed: systemctl enable --now" "$out" || fail "no clear error from the installer"
  grep -qi "checkpoint" "$out" || fail "the installer did not show the daemon's reason"
  [ "$(systemctl show -p ExecMainStatus --value nilmd)" = 78 ] || fail "exit status $(systemctl show -p ExecMainStatus --value nilmd), expected 78"
  sleep 1.5  # RestartSec=10s would not have fired yet anyway; NRestarts must simply stay 0
  [ "$(systemctl show -p NRestarts --value nilmd)" = 0 ] && [ "$(systemctl show -p ActiveState --value nilmd)" = failed ] ||
    fail "exit 78 was restarted or not failed: $(systemctl show -p NRestarts -p ActiveState nilmd | tr '\n' ' ')"
  rm -rf /var/lib/nilmd/checkpoints && mv /run/ckpt-aside /var/lib/nilmd/checkpoints
  pass "no checkpoints: exit 78, not restarted, the installer fails with the daemon's reason"
  inst --checkpoints "$ckpt" --enable
  [ "$sum" = "$(sha256sum /etc/nilmd/nilmd.env)" ] || fail "install.sh changed /etc/nilmd/nilmd.env"
  systemctl is-enabled --quiet nilmd || fail "not enabled"
  [ "$(systemctl show -p ActiveState --value nilmd)" = active ] || fail "not active: $(systemctl status --no-pager nilmd | tail -20)"
  main="$(systemctl show -p MainPID --value nilmd)"
  [ "$(ps -o user= -p "$main")" = nilmd ] || fail "the service does not run as nilmd"
  journalctl --no-pager -o cat -u nilmd | grep -q 'models loaded: 11 of 11' || fail "no 'models loaded' in the journal"
  if /opt/nilmd/venv/bin/python -c 'import systemd.journal' 2>/dev/null; then
    journalctl --no-pager -o cat -u nilmd NILMD_ROLE=inference | grep -q 'models loaded' ||
      fail "systemd-python is installed but journalctl NILMD_ROLE=inference finds nothing"
  fi
  # no /etc/nilmd/redis-password: the empty SetCredential= fallback let it start without one
  [ ! -e /etc/nilmd/redis-password ] || fail "test set-up: a password file exists"
  v="$(systemd-analyze verify /etc/systemd/system/nilmd.service 2>&1)"; [ -z "$v" ] || fail "verify of the installed unit: $v"
  pass "--enable: active as user nilmd with the shipped unit (verify clean), no password file, nilmd.env untouched"
  ;;
onnx)
  # the running torch install switched to ONNX Runtime ($ckpt holds the test's export)
  inst --backend onnxruntime --checkpoints "$ckpt"
  /opt/nilmd/venv/bin/python -c 'import torch' 2>/dev/null && fail "torch is still in the venv"
  /opt/nilmd/venv/bin/python -c 'import onnxruntime' || fail "onnxruntime is not in the venv"
  for f in /var/lib/nilmd/checkpoints/nilmd-onnx.json /var/lib/nilmd/checkpoints/nilmd-onnx-group0-step1.onnx; do perm "$f" "root:nilmd 640"; done
  wait_until 60 "the restarted service to serve with onnxruntime" sh -c \
    "journalctl --no-pager -o cat -u nilmd | grep -q 'models loaded: 11 of 11 .* with onnxruntime'"
  [ "$(systemctl show -p ActiveState --value nilmd)" = active ] || fail "not active after the switch"
  inst --backend onnxruntime --checkpoints "$ckpt"
  grep -q "^nothing changed" "$out" || fail "a second --backend onnxruntime run changed something"
  pass "--backend onnxruntime: torch removed, onnxruntime and the export installed, serving with onnxruntime; again: nothing changed"
  ;;
instance)
  # The installed template as it is: an instance of the building id in nilmd.env's place (its
  # BUILDING_ID there is overridden by the instance name); nilmd.service and the instances
  # exclude each other (Conflicts=), both ways.
  id="${building}-2"
  systemctl is-active --quiet nilmd || fail "nilmd.service is not running before the instance"
  timeout 120 systemctl start "nilmd@$id" || fail "nilmd@$id did not start: $(journalctl --no-pager -o cat -u "nilmd@$id" | tail -30)"
  systemctl is-active --quiet nilmd && fail "nilmd.service still runs beside nilmd@$id"
  main="$(systemctl show -p MainPID --value "nilmd@$id")"
  [ "$(ps -o user= -p "$main")" = nilmd ] || fail "nilmd@$id does not run as nilmd"
  [ -e "/run/nilmd/$id/nilmd-$id.ring" ] || fail "no ring in /run/nilmd/$id: $(ls -AR /run/nilmd 2>&1)"
  v="$(systemd-analyze verify "/etc/systemd/system/nilmd@$id.service" 2>&1)"; [ -z "$v" ] || fail "verify of nilmd@$id: $v"
  timeout 120 systemctl start nilmd || fail "nilmd.service did not start again"
  systemctl is-active --quiet "nilmd@$id" && fail "nilmd@$id still runs beside nilmd.service"
  [ ! -e "/run/nilmd/$id" ] || fail "/run/nilmd/$id is left"
  pass "the installed template runs nilmd@$id as user nilmd; it and nilmd.service stop each other"
  ;;
uninstall)
  inst --uninstall --dry-run
  [ -d /opt/nilmd ] && systemctl is-active --quiet nilmd || fail "--uninstall --dry-run removed something"
  inst --uninstall
  systemctl is-active --quiet nilmd && fail "still running"
  [ -e /etc/systemd/system/nilmd.service ] && fail "the unit is still there"
  [ -e /etc/systemd/system/nilmd@.service ] && fail "the template is still there"
  systemctl cat nilmd.service >/dev/null 2>&1 && fail "systemd still knows the unit (no daemon-reload?)"
  [ -e /opt/nilmd ] && fail "/opt/nilmd is still there"
  [ -e /run/nilmd ] && fail "/run/nilmd (shared memory) is still there"
  [ -f /etc/nilmd/nilmd.env ] && [ -d /var/lib/nilmd/checkpoints ] && getent passwd nilmd >/dev/null || fail "config, state or user were not kept"
  inst --uninstall
  grep -q "^nothing changed" "$out" || fail "a second --uninstall changed something"
  inst --uninstall --purge
  [ -e /etc/nilmd ] || [ -e /var/lib/nilmd ] && fail "--purge left /etc/nilmd or /var/lib/nilmd"
  getent passwd nilmd >/dev/null && fail "--purge left the user"
  pass "--uninstall keeps config, state and user; again: nothing changed; --purge removes them"
  ;;
*) fail "unknown step $step" ;;
esac

#!/usr/bin/env bash
# install.sh - install, upgrade or remove nilmd as a systemd service on a Debian, Ubuntu or
# Raspberry Pi OS box. Run it as root from the nilmd source tree it should install:
#
#     sudo scripts/install.sh [--enable]          install or upgrade (idempotent)
#     sudo scripts/install.sh --dry-run           print what it would do, change nothing
#     sudo scripts/install.sh --uninstall         remove the service and /opt/nilmd
#     sudo scripts/install.sh --uninstall --purge also /etc/nilmd, /var/lib/nilmd, user nilmd
#
# What it sets up
#   user nilmd (system user, no login)    runs the service (User= in the unit)
#   /opt/nilmd/venv                       Python venv: nilmd from this tree, torch (or onnxruntime:
#                                         --backend onnxruntime), systemd-python
#   /opt/nilmd/{README.md,OPERATIONS.md,nilmd.env.example}
#   /etc/nilmd/nilmd.env                  settings (root:nilmd 0640); written once, never overwritten
#   /var/lib/nilmd/checkpoints/           the 11 model checkpoints (root:nilmd 0640), and with
#                                         --backend onnxruntime their ONNX export (nilmd-onnx*)
#   /etc/systemd/system/nilmd.service     the unit (+ nilmd.service.d/gpu.conf on a GPU box)
#   /etc/systemd/system/nilmd@.service    the template, one nilmd per building (+ the same gpu.conf):
#                                         systemctl enable --now nilmd@ID, settings /etc/nilmd/ID.env
#
# Options
#   --enable               also `systemctl enable --now nilmd`
#   --backend B            torch (default) or onnxruntime: no torch on the box (it is removed from
#                          the venv if there), ONNX Runtime serves the ONNX export that must lie
#                          beside the checkpoints (`nilmd export`, where torch is; docs/OPERATIONS.md, Backends)
#   --torch MODE           auto (default: CUDA build if `nvidia-smi -L` works, else CPU build),
#                          cpu, cuda, or skip (leave torch alone)
#   --torch-version V      torch version to install (default 2.13.0)
#   --torch-index URL      package index for torch. Default: pip's own configuration when it
#                          resolves to the wanted build (a local mirror or wheelhouse), else the
#                          PyTorch CPU index for cpu. A CPU box never gets a CUDA build: the
#                          resolution is checked before anything is installed.
#   --gpu | --no-gpu       install the GPU drop-in or not (default: with a CUDA torch)
#   --checkpoints DIR      where to take the checkpoints from (default: ./checkpoints of this tree)
#   --no-journal           do not install systemd-python (logs then go to the journal as plain
#                          stderr lines with priority prefixes, without NILMD_* fields)
#   --python PATH          interpreter for the venv (default /usr/bin/python3, the distro's)
#   --dry-run              print each action instead of doing it
#   --uninstall [--purge]  remove (see above)
#   -h | --help
#
# Exit status: 0 done (or nothing to do), 1 failed (the message says why), 2 bad usage.
set -euo pipefail
umask 022 # the venv and the unit must be readable by the nilmd user whatever root's umask is

PREFIX=/opt/nilmd
VENV=$PREFIX/venv
CONF_DIR=/etc/nilmd
STATE_DIR=/var/lib/nilmd
MODEL_DIR=$STATE_DIR/checkpoints
UNIT_DIR=/etc/systemd/system
UNIT=nilmd.service
DROPIN_DIR=$UNIT_DIR/$UNIT.d
SVC_USER=nilmd
FINGERPRINT=$PREFIX/.source-sha256
CPU_INDEX=https://download.pytorch.org/whl/cpu

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON="$(command -v python3 || echo python3)"
BACKEND=torch TORCH=auto TORCH_VERSION=2.13.0 TORCH_INDEX=auto GPU=auto CKPT_SRC="" JOURNAL=yes
ENABLE=0 UNINSTALL=0 PURGE=0 DRY=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --enable) ENABLE=1; shift;;
    --backend) BACKEND="${2:-}"; shift 2;;
    --torch) TORCH="${2:-}"; shift 2;;
    --torch-version) TORCH_VERSION="${2:-}"; shift 2;;
    --torch-index) TORCH_INDEX="${2:-}"; shift 2;;
    --gpu) GPU=yes; shift;;
    --no-gpu) GPU=no; shift;;
    --checkpoints) CKPT_SRC="${2:-}"; shift 2;;
    --no-journal) JOURNAL=no; shift;;
    --python) PYTHON="${2:-}"; shift 2;;
    --dry-run) DRY=1; shift;;
    --uninstall) UNINSTALL=1; shift;;
    --purge) PURGE=1; shift;;
    -h|--help) usage; exit 0;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
case "$TORCH" in auto|cpu|cuda|skip) ;; *) echo "install.sh: --torch must be auto, cpu, cuda or skip" >&2; exit 2;; esac
case "$BACKEND" in torch|onnxruntime) ;; *) echo "install.sh: --backend must be torch or onnxruntime" >&2; exit 2;; esac
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || { echo "install.sh: --purge goes with --uninstall" >&2; exit 2; }

# ------------------------------------------------------------------------------ reporting
CHANGES=0 UNCHANGED=0 RESTART=0 RELOAD=0
say()  { printf '%s\n' "$*"; }
step() { printf '\n== %s\n' "$*"; }
ok()   { UNCHANGED=$((UNCHANGED + 1)); printf '   ok: %s\n' "$*"; }
warn() { printf '   WARNING: %s\n' "$*" >&2; }
die()  { printf 'install.sh: ERROR: %s\n' "$*" >&2; exit 1; }
# act WHAT COMMAND...: make one change, or with --dry-run only print it.
act() {
  local what="$1"; shift
  CHANGES=$((CHANGES + 1))
  if [ "$DRY" = 1 ]; then
    printf '   would: %s\n' "$what"
    # show the command itself when it says more than the line above
    case "$1" in sh|true) ;; *) printf '          $'; printf ' %q' "$@"; printf '\n';; esac
  else
    "$@" || die "failed: $what ($*)"
    printf '   done: %s\n' "$what"
  fi
}
quiet() { "$@" >/dev/null 2>&1; }
systemd_running() { [ -d /run/systemd/system ]; }
have_apt() { command -v apt-get >/dev/null && [ -d /var/lib/dpkg ]; }
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null ||
                { DEBIAN_FRONTEND=noninteractive apt-get update >/dev/null &&
                  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null; }; }
vpy() { "$VENV/bin/python" "$@"; }
vpip() { "$VENV/bin/python" -m pip --disable-pip-version-check --no-input "$@"; }
same_file() { [ -f "$2" ] && cmp -s "$1" "$2"; }
# ensure_dir PATH OWNER:GROUP MODE
ensure_dir() {
  if [ ! -d "$1" ]; then
    act "create $1 ($2, $3)" install -d -o "${2%:*}" -g "${2#*:}" -m "$3" "$1"
  elif [ "$(stat -c '%U:%G %a' "$1")" != "$2 ${3#0}" ]; then
    act "set $1 to $2, mode $3 (was $(stat -c '%U:%G %a' "$1"))" sh -c 'chown "$1" "$3" && chmod "$2" "$3"' _ "$2" "$3" "$1"
  else
    ok "$1 ($2, $3)"
  fi
}
# put_file SRC DEST MODE OWNER:GROUP: install or update DEST atomically (a temp file, then rename)
put_file() {
  if same_file "$1" "$2" && [ "$(stat -c '%U:%G %a' "$2")" = "$4 ${3#0}" ]; then ok "$2"; return 1; fi
  act "$([ -e "$2" ] && echo update || echo install) $2" sh -c \
    'install -m "$3" -o "${4%:*}" -g "${4#*:}" "$1" "$2.nilmd-new" && mv -f "$2.nilmd-new" "$2"' _ "$1" "$2" "$3" "$4"
}
TMP=""
cleanup() { [ -z "$TMP" ] || rm -rf "$TMP"; }
trap cleanup EXIT
tmpdir() { [ -n "$TMP" ] || TMP="$(mktemp -d /tmp/nilmd-install.XXXXXX)"; }

# ------------------------------------------------------------------------------ preflight
preflight() {
  if [ "$(id -u)" != 0 ]; then
    [ "$DRY" = 1 ] || die "run me as root (sudo $0 ...), or with --dry-run to see what I would do"
    warn "not root: --dry-run only, some checks may be incomplete"
  fi
  grep -qsE '^(ID|ID_LIKE)=.*\b(debian|ubuntu|raspbian)\b' /etc/os-release /usr/lib/os-release ||
    warn "not a Debian-family system: expect to install the system packages yourself"
  command -v systemctl >/dev/null || die "systemctl not found: nilmd runs under systemd"
  if [ "$DRY" = 0 ]; then
    mkdir -p /run/lock
    exec 9>/run/lock/nilmd-install.lock
    flock -n 9 || die "another install.sh is running"
  fi
}

# ------------------------------------------------------------------------------ uninstall
uninstall() {
  step "service"
  if systemd_running && quiet systemctl cat "$UNIT"; then
    if systemctl is-enabled --quiet "$UNIT" 2>/dev/null || systemctl is-active --quiet "$UNIT" 2>/dev/null; then
      act "stop and disable $UNIT" systemctl disable --now --quiet "$UNIT"
    else
      ok "$UNIT is stopped and disabled"
    fi
  fi
  local reload=0
  if [ -e "$UNIT_DIR/$UNIT" ]; then act "remove $UNIT_DIR/$UNIT" rm -f "$UNIT_DIR/$UNIT"; reload=1; fi
  if [ -e "$DROPIN_DIR/gpu.conf" ]; then act "remove $DROPIN_DIR/gpu.conf" rm -f "$DROPIN_DIR/gpu.conf"; reload=1; fi
  if [ -d "$DROPIN_DIR" ]; then
    if [ "$PURGE" = 1 ]; then act "remove $DROPIN_DIR (your drop-ins too: --purge)" rm -rf "$DROPIN_DIR"; reload=1
    elif [ -z "$(find "$DROPIN_DIR" -mindepth 1 -maxdepth 1 ! -name gpu.conf)" ]; then act "remove the empty $DROPIN_DIR" rm -rf "$DROPIN_DIR"
    else warn "kept $DROPIN_DIR: it holds your own drop-ins"; fi
  fi
  if [ "$reload" = 1 ] && systemd_running; then act "systemctl daemon-reload" systemctl daemon-reload; fi
  step "files"
  if [ -e "$PREFIX" ]; then act "remove $PREFIX (venv)" rm -rf "$PREFIX"; else ok "$PREFIX is gone"; fi
  if [ "$PURGE" = 1 ]; then
    if [ -e "$CONF_DIR" ]; then act "remove $CONF_DIR (settings, password)" rm -rf "$CONF_DIR"; else ok "$CONF_DIR is gone"; fi
    if [ -e "$STATE_DIR" ]; then act "remove $STATE_DIR (checkpoints, state)" rm -rf "$STATE_DIR"; else ok "$STATE_DIR is gone"; fi
    if getent passwd "$SVC_USER" >/dev/null; then act "remove user $SVC_USER" userdel "$SVC_USER"; else ok "user $SVC_USER is gone"; fi
    if getent group "$SVC_USER" >/dev/null; then act "remove group $SVC_USER" groupdel "$SVC_USER"; fi
  else
    for keep in "$CONF_DIR" "$STATE_DIR"; do [ -e "$keep" ] && say "   kept: $keep"; done
    getent passwd "$SVC_USER" >/dev/null && say "   kept: user $SVC_USER"
    say "   (--uninstall --purge removes those too)"
  fi
}

# ------------------------------------------------------------------------------ install steps
packages() {
  step "system packages"
  if quiet "$PYTHON" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 10)'; then
    ok "$PYTHON $("$PYTHON" -c 'import platform; print(platform.python_version())') with venv"
  elif have_apt; then
    act "apt-get install python3-venv" apt_install python3-venv
  else
    die "$PYTHON (3.10 or newer, with the venv module) is needed"
  fi
  if [ "$JOURNAL" = yes ] && ! quiet "$PYTHON" -c 'import systemd.journal'; then
    if have_apt && apt-cache show python3-systemd >/dev/null 2>&1; then
      act "apt-get install python3-systemd (journald fields)" apt_install python3-systemd
    else
      say "   note: python3-systemd is not available here; will try to build systemd-python"
    fi
  fi
}

user() {
  step "user"
  if getent passwd "$SVC_USER" >/dev/null; then
    ok "user $SVC_USER exists (uid $(id -u "$SVC_USER"))"
  else
    act "create system user $SVC_USER" useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
      --shell /usr/sbin/nologin --comment "nilmd NILM daemon" "$SVC_USER"
  fi
}

directories() {
  step "directories"
  ensure_dir "$PREFIX" root:root 0755
  ensure_dir "$CONF_DIR" "root:$SVC_USER" 0750
  # nilmd owns its state directory (systemd's StateDirectory= would chown it anyway); the
  # checkpoints inside stay root's, so the service can read but not change them.
  ensure_dir "$STATE_DIR" "$SVC_USER:$SVC_USER" 0700
  ensure_dir "$MODEL_DIR" "root:$SVC_USER" 0750
}

venv() {
  step "venv $VENV"
  local want have=""
  want="$("$PYTHON" -c 'import platform; print(platform.python_version())')"
  [ -x "$VENV/bin/python" ] && have="$(vpy -c 'import platform; print(platform.python_version())' 2>/dev/null || true)"
  if [ -z "$have" ]; then
    act "create the venv (Python $want)" "$PYTHON" -m venv "$VENV"
    RESTART=1
  elif [ "$have" != "$want" ]; then
    # The distro upgraded its Python: compiled packages in the old venv would not load.
    act "recreate the venv (Python $have -> $want)" sh -c 'rm -rf "$1" && "$2" -m venv "$1"' _ "$VENV" "$PYTHON"
    RESTART=1
  else
    ok "venv with Python $have"
  fi
  if [ "$DRY" = 1 ] && [ ! -x "$VENV/bin/python" ]; then
    act "install pip>=23, setuptools>=77 and wheel into the venv (to build nilmd)" true
    return
  fi
  # Build tools for nilmd's pyproject (setuptools>=77) and pip >= 23 for `--report`.
  if quiet vpy - <<'EOF'
import importlib.metadata as m
v = lambda name: tuple(int(x) for x in m.version(name).split(".")[:2])
assert v("pip") >= (23, 0) and v("setuptools") >= (77, 0) and m.version("wheel")
EOF
  then ok "pip, setuptools and wheel in the venv"
  else act "install pip>=23, setuptools>=77 and wheel into the venv" vpip install --quiet "pip>=23" "setuptools>=77" wheel
  fi
}

# Print "VERSION cpu|cuda" of the torch in the venv, or nothing.
torch_installed() {
  [ -x "$VENV/bin/python" ] || return 0
  vpy - 2>/dev/null <<'EOF' || true
import importlib.util
if importlib.util.find_spec("torch"):
    import torch
    print(torch.__version__.split("+")[0], "cuda" if torch.version.cuda else "cpu")
EOF
}

# Resolve torch==$TORCH_VERSION with pip (extra pip args in "$@") without installing anything,
# and print the build it would install: "cpu", "cuda", or nothing if it cannot be resolved.
torch_resolves_to() {
  tmpdir
  rm -f "$TMP/report.json"
  vpip install --quiet --dry-run --ignore-installed --report "$TMP/report.json" "$@" "torch==$TORCH_VERSION" \
    >/dev/null 2>"$TMP/resolve.err" || return 0
  vpy - "$TMP/report.json" <<'EOF'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
names = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in items}
local = names.get("torch", "").partition("+")[2]
# CUDA builds either carry a +cuXXX tag (PyTorch's index) or pull nvidia-* runtime wheels (PyPI)
cuda = local.startswith(("cu", "rocm")) or any(n.startswith(("nvidia-", "triton")) for n in names)
print("cuda" if cuda else "cpu")
EOF
}

torch_step() {
  step "torch"
  local want="$TORCH" have
  if [ "$BACKEND" = onnxruntime ]; then
    FLAVOR=cpu
    if [ -n "$(torch_installed)" ]; then act "remove torch from the venv (--backend onnxruntime)" vpip uninstall --quiet -y torch; RESTART=1
    else ok "no torch (--backend onnxruntime)"; fi
    return
  fi
  if [ "$want" = skip ]; then ok "torch left alone (--torch skip)"; FLAVOR="$(torch_installed | awk '{print $2}')"; return; fi
  if [ "$want" = auto ]; then
    if command -v nvidia-smi >/dev/null && quiet nvidia-smi -L; then want=cuda; else want=cpu; fi
    say "   this box: $([ "$want" = cuda ] && echo "an NVIDIA GPU (nvidia-smi -L works)" || echo "no NVIDIA GPU") -> $want build"
  fi
  FLAVOR=$want
  have="$(torch_installed)"
  if [ "$have" = "$TORCH_VERSION $want" ]; then ok "torch $TORCH_VERSION ($want build)"; return; fi
  [ -n "$have" ] && say "   installed: torch ${have% *} (${have#* } build); wanted: $TORCH_VERSION ($want)"
  if [ "$DRY" = 1 ] && [ ! -x "$VENV/bin/python" ]; then
    act "install torch $TORCH_VERSION ($want build)" true; RESTART=1; return
  fi
  # Pick where the wanted build comes from, and prove it is that build before installing.
  local -a args=() tried=()
  local got
  if [ "$TORCH_INDEX" != auto ]; then
    args=(--index-url "$TORCH_INDEX"); got="$(torch_resolves_to "${args[@]}")"; tried+=("$TORCH_INDEX: ${got:-no match}")
  else
    got="$(torch_resolves_to)"; tried+=("pip's configuration: ${got:-no match}")
    if [ "$got" != "$want" ] && [ "$want" = cpu ]; then
      args=(--index-url "$CPU_INDEX"); got="$(torch_resolves_to "${args[@]}")"; tried+=("$CPU_INDEX: ${got:-no match}")
    fi
  fi
  if [ "$got" != "$want" ]; then
    [ -f "${TMP:-}/resolve.err" ] && tail -n 3 "$TMP/resolve.err" | sed 's/^/   pip: /' >&2
    local joined; joined="$(printf '%s; ' "${tried[@]}")"
    die "no $want build of torch $TORCH_VERSION found (tried: ${joined%; }). Use --torch-index URL, or --torch skip and install torch into $VENV yourself."
  fi
  # Another build of the same version (2.13.0+cpu vs 2.13.0) satisfies the pin: force the switch.
  local -a extra=()
  [ -z "$have" ] || extra=(--force-reinstall)
  [ "$DRY" = 1 ] || say "   installing torch $TORCH_VERSION ($want build): this takes a while"
  act "install torch $TORCH_VERSION ($want build${args[*]:+, from ${args[1]}})" \
    vpip install --quiet --upgrade-strategy only-if-needed "${args[@]}" "${extra[@]}" "torch==$TORCH_VERSION"
  RESTART=1
  if [ "$DRY" = 0 ]; then
    have="$(torch_installed)"
    [ "$have" = "$TORCH_VERSION $want" ] || die "torch in the venv is '$have' after installing, expected '$TORCH_VERSION $want'"
  fi
}

onnxruntime_step() {
  step "onnxruntime"
  if [ "$BACKEND" != onnxruntime ]; then ok "not needed (--backend torch)"; return; fi
  if [ -x "$VENV/bin/python" ] && quiet vpy -c 'import onnxruntime'; then
    ok "onnxruntime $(vpy -c 'import onnxruntime; print(onnxruntime.__version__)')"; return
  fi
  act "install onnxruntime into the venv" vpip install --quiet "onnxruntime>=1.17"
  RESTART=1
}

source_fingerprint() {
  (cd "$SRC" && find nilmd -type f ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum &&
    sha256sum pyproject.toml LICENSE docs/PYPI.md) |
    sha256sum | cut -d' ' -f1
}

nilmd_step() {
  step "nilmd from $SRC"
  [ -f "$SRC/pyproject.toml" ] && grep -q '^name = "nilmd"' "$SRC/pyproject.toml" || die "$SRC is not the nilmd source tree"
  local fp version
  fp="$(source_fingerprint)"
  version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$SRC/nilmd/__init__.py")"
  if [ -x "$VENV/bin/nilmd" ] && [ "$(cat "$FINGERPRINT" 2>/dev/null)" = "$fp" ]; then
    ok "nilmd $version (source unchanged since the last install)"
    return
  fi
  # Build from a copy: the source tree may be read-only, and setuptools would litter it.
  if [ "$DRY" = 1 ]; then
    act "install nilmd $version into the venv" true
  else
    tmpdir
    mkdir -p "$TMP/src/docs"
    cp -r "$SRC/nilmd" "$SRC/pyproject.toml" "$SRC/LICENSE" "$TMP/src/"
    cp "$SRC/docs/PYPI.md" "$TMP/src/docs/"
    find "$TMP/src" -name __pycache__ -prune -exec rm -rf {} +
    act "install nilmd $version into the venv" vpip install --quiet --no-build-isolation "$TMP/src"
    act "record the installed source ($FINGERPRINT)" sh -c 'echo "$1" > "$2"' _ "$fp" "$FINGERPRINT"
  fi
  RESTART=1
}

journal_step() {
  step "systemd-python (journald fields)"
  if [ "$JOURNAL" = no ]; then ok "skipped (--no-journal)"; return; fi
  if [ -x "$VENV/bin/python" ] && quiet vpy -c 'import systemd.journal'; then ok "systemd-python importable in the venv"; return; fi
  local site sys_pkg=""
  if [ "$DRY" = 1 ] && [ ! -x "$VENV/bin/python" ]; then act "make systemd-python importable in the venv" true; return; fi
  site="$(vpy -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # The distro's python3-systemd is built for the distro's Python, which is the venv's own
  # interpreter: link just that package into the venv (no compiler, no other system packages).
  if [ "$(vpy -c 'import sys; print(sys.version)')" = "$("$PYTHON" -c 'import sys; print(sys.version)')" ]; then
    sys_pkg="$("$PYTHON" -c 'import os, systemd.journal as j; print(os.path.dirname(j.__file__))' 2>/dev/null || true)"
  fi
  if [ -n "$sys_pkg" ]; then
    act "link $sys_pkg into the venv" ln -sfn "$sys_pkg" "$site/systemd"
    RESTART=1
    return
  fi
  # Else build it: needs libsystemd's headers, pkg-config, a compiler and Python's headers.
  if ! { quiet pkg-config --exists libsystemd && command -v cc >/dev/null; } && have_apt; then
    act "apt-get install libsystemd-dev pkg-config gcc python3-dev (to build systemd-python)" \
      apt_install libsystemd-dev pkg-config gcc python3-dev
  fi
  if [ "$DRY" = 1 ] || { quiet pkg-config --exists libsystemd && command -v cc >/dev/null; }; then
    CHANGES=$((CHANGES + 1))
    if [ "$DRY" = 1 ]; then say "   would: pip install systemd-python"
    elif vpip install --quiet systemd-python; then say "   done: pip install systemd-python"; RESTART=1
    else CHANGES=$((CHANGES - 1)); warn "could not build systemd-python: logs go to the journal as plain lines"; fi
  else
    warn "no python3-systemd and no build tools: logs go to the journal as plain lines without NILMD_* fields"
  fi
}

checkpoints_step() {
  step "checkpoints -> $MODEL_DIR"
  local src="${CKPT_SRC:-$SRC/checkpoints}" f dest
  shopt -s nullglob
  local files=("$src"/wavenilm_v3_SOTA_*_best.pth) todo=()
  # the export's graphs, then its manifest: copied in this order, a reload sees a whole set
  [ "$BACKEND" = torch ] || files+=("$src"/nilmd-onnx-group*.onnx "$src"/nilmd-onnx.json)
  shopt -u nullglob
  if [ "$BACKEND" = onnxruntime ] && [ ${#files[@]} -gt 0 ]; then
    local why
    if [ "$DRY" = 1 ] && [ ! -x "$VENV/bin/python" ]; then why=""
    elif ! why="$(vpy - "$src" 2>&1 <<'EOF'
import sys
from nilmd.models.onnx_backend import OnnxExportError, OnnxPredictor
try:
    OnnxPredictor(sys.argv[1])
except OnnxExportError as e:
    sys.exit(str(e))
EOF
)"; then
      die "$src cannot be served without torch: $(printf '%s' "$why" | tail -n 1)"
    fi
  fi
  if [ ${#files[@]} -eq 0 ]; then
    local have; have="$(find "$MODEL_DIR" -name 'wavenilm_v3_SOTA_*_best.pth' 2>/dev/null | wc -l)"
    if [ "$have" -gt 0 ]; then ok "$have checkpoints in place (none in $src to update them from)"
    else warn "no checkpoints in $src: put the 11 wavenilm_v3_SOTA_<Appliance>_best.pth files in $MODEL_DIR (root:$SVC_USER, 0640), then systemctl restart nilmd"; fi
    return
  fi
  for f in "${files[@]}"; do
    dest="$MODEL_DIR/$(basename "$f")"
    same_file "$f" "$dest" && [ "$(stat -c '%U:%G %a' "$dest")" = "root:$SVC_USER 640" ] || todo+=("$f")
  done
  if [ ${#todo[@]} -eq 0 ]; then ok "${#files[@]} checkpoints up to date"; return; fi
  # One file at a time through a temp name and a rename, so that a reload never reads half a file.
  act "copy ${#todo[@]} of ${#files[@]} $([ "$BACKEND" = torch ] && echo checkpoints || echo "checkpoint and ONNX files") from $src" sh -c '
    g="$1"; d="$2"; shift 2
    for f in "$@"; do
      install -m 0640 -o root -g "$g" "$f" "$d/.$(basename "$f").new" && mv -f "$d/.$(basename "$f").new" "$d/$(basename "$f")" || exit 1
    done' _ "$SVC_USER" "$MODEL_DIR" "${todo[@]}"
  RELOAD=1
}

config_step() {
  step "configuration"
  put_file "$SRC/systemd/nilmd.env" "$PREFIX/nilmd.env.example" 0644 root:root || true
  put_file "$SRC/README.md" "$PREFIX/README.md" 0644 root:root || true
  put_file "$SRC/docs/OPERATIONS.md" "$PREFIX/OPERATIONS.md" 0644 root:root || true  # the alerts' runbook
  if [ -e "$CONF_DIR/nilmd.env" ]; then
    ok "$CONF_DIR/nilmd.env kept as it is (yours; the current example is $PREFIX/nilmd.env.example)"
  else
    act "install $CONF_DIR/nilmd.env (every setting at its default; edit it)" \
      install -m 0640 -o root -g "$SVC_USER" "$SRC/systemd/nilmd.env" "$CONF_DIR/nilmd.env"
  fi
  if [ -e "$CONF_DIR/redis-password" ] && [ "$(stat -c '%U:%G %a' "$CONF_DIR/redis-password")" != "root:$SVC_USER 640" ]; then
    act "set $CONF_DIR/redis-password to root:$SVC_USER 0640" sh -c 'chown "root:$1" "$2" && chmod 0640 "$2"' _ "$SVC_USER" "$CONF_DIR/redis-password"
  fi
}

unit_step() {
  step "systemd unit"
  local changed=0 gpu="$GPU"
  if put_file "$SRC/systemd/$UNIT" "$UNIT_DIR/$UNIT" 0644 root:root; then changed=1; fi
  [ "$gpu" = auto ] && gpu=$([ "${FLAVOR:-}" = cuda ] && echo yes || echo no)
  if [ "$gpu" = yes ]; then
    [ -d "$DROPIN_DIR" ] || act "create $DROPIN_DIR" install -d -m 0755 "$DROPIN_DIR"
    if put_file "$SRC/systemd/gpu.conf" "$DROPIN_DIR/gpu.conf" 0644 root:root; then changed=1; fi
  elif [ -e "$DROPIN_DIR/gpu.conf" ]; then
    say "   note: $DROPIN_DIR/gpu.conf is installed but this is not a CUDA install (remove it, or --gpu)"
  fi
  if [ "$changed" = 1 ]; then
    RESTART=1
    if systemd_running; then act "systemctl daemon-reload" systemctl daemon-reload
    else say "   note: systemd is not running here: no daemon-reload"; fi
  fi
}

# systemctl enable --now / restart; on failure show why (the unit's last log lines) before dying.
start_service() {
  systemctl "$@" --quiet "$UNIT" && return 0
  systemctl status --no-pager --lines=0 "$UNIT" 2>&1 | sed 's/^/   | /' >&2 || true
  journalctl --no-pager -o cat -n 15 -u "$UNIT" 2>&1 | sed 's/^/   | /' >&2 || true
  return 1
}

service_step() {
  step "service"
  systemd_running || { say "   note: systemd is not running here: not starting anything"; return; }
  if [ "$ENABLE" = 1 ]; then
    if systemctl is-enabled --quiet "$UNIT" 2>/dev/null && systemctl is-active --quiet "$UNIT"; then
      ok "$UNIT is enabled and running"
    else
      act "systemctl enable --now $UNIT" start_service enable --now
      RESTART=0 RELOAD=0
    fi
  fi
  if systemctl is-active --quiet "$UNIT" 2>/dev/null; then
    if [ "$RESTART" = 1 ]; then act "restart $UNIT (new code or unit)" start_service restart
    elif [ "$RELOAD" = 1 ]; then act "reload $UNIT (new checkpoints)" systemctl reload "$UNIT"; fi
  elif [ "$ENABLE" = 0 ]; then
    say "   not running; start it with:  systemctl enable --now nilmd"
  fi
}

# ------------------------------------------------------------------------------ nilmd@.service
# The template (one nilmd per building: systemctl enable --now nilmd@ID, settings in
# /etc/nilmd/ID.env) is installed beside the unit, with the drop-ins nilmd.service got here.
TEMPLATE=nilmd@.service TEMPLATE_CHANGED=0
# every nilmd@ID.service that systemd has loaded (running, failed) or that is enabled
instances() {
  { systemd_running && systemctl list-units --all --plain --no-legend 'nilmd@*.service' | grep -o 'nilmd@[^ ]*[.]service'
    find "$UNIT_DIR" -path '*.wants/nilmd@*.service' -printf '%f\n' 2>/dev/null; } | sort -u
}
template_step() {
  step "systemd template $TEMPLATE"
  if put_file "$SRC/systemd/$TEMPLATE" "$UNIT_DIR/$TEMPLATE" 0644 root:root; then TEMPLATE_CHANGED=1; fi
  if [ -e "$DROPIN_DIR/gpu.conf" ]; then
    [ -d "$UNIT_DIR/$TEMPLATE.d" ] || act "create $UNIT_DIR/$TEMPLATE.d" install -d -m 0755 "$UNIT_DIR/$TEMPLATE.d"
    if put_file "$DROPIN_DIR/gpu.conf" "$UNIT_DIR/$TEMPLATE.d/gpu.conf" 0644 root:root; then TEMPLATE_CHANGED=1; fi
  elif [ -e "$UNIT_DIR/$TEMPLATE.d/gpu.conf" ]; then
    say "   note: $UNIT_DIR/$TEMPLATE.d/gpu.conf is installed but nilmd.service has none (remove it, or --gpu)"
  fi
  if [ "$TEMPLATE_CHANGED" = 1 ] && systemd_running; then act "systemctl daemon-reload" systemctl daemon-reload; fi
}
# Running instances get what nilmd.service gets: a restart for new code or units, a reload for
# new checkpoints. Starting and enabling them is the operator's (docs/OPERATIONS.md).
instances_step() {
  local u
  for u in $(instances); do
    systemctl is-active --quiet "$u" || continue
    if [ "$RESTART" = 1 ] || [ "$TEMPLATE_CHANGED" = 1 ]; then act "restart $u (new code or unit)" systemctl restart --quiet "$u"
    elif [ "$RELOAD" = 1 ]; then act "reload $u (new checkpoints)" systemctl reload "$u"
    else ok "$u is running"; fi
  done
}
uninstall_template() {
  step "systemd template $TEMPLATE"
  local u reload=0
  for u in $(instances); do
    if systemctl is-enabled --quiet "$u" 2>/dev/null || systemctl is-active --quiet "$u" 2>/dev/null; then
      act "stop and disable $u" systemctl disable --now --quiet "$u"
    fi
  done
  for u in "$UNIT_DIR/$TEMPLATE" "$UNIT_DIR/$TEMPLATE.d/gpu.conf"; do
    if [ -e "$u" ]; then act "remove $u" rm -f "$u"; reload=1; fi
  done
  for u in "$UNIT_DIR"/nilmd@*.service.d; do  # the template's, and the instances' (nilmd@ID)
    [ -d "$u" ] || continue
    if [ "$PURGE" = 1 ]; then act "remove $u (your drop-ins too: --purge)" rm -rf "$u"; reload=1
    elif [ "$u" = "$UNIT_DIR/$TEMPLATE.d" ] && [ -z "$(find "$u" -mindepth 1 -maxdepth 1 ! -name gpu.conf)" ]; then
      act "remove the empty $u" rm -rf "$u"
    else warn "kept $u: it holds your own drop-ins"; fi
  done
  [ "$reload" = 1 ] || ok "no $TEMPLATE installed"
  if [ "$reload" = 1 ] && systemd_running; then act "systemctl daemon-reload" systemctl daemon-reload; fi
}

# ------------------------------------------------------------------------------ main
preflight
if [ "$UNINSTALL" = 1 ]; then
  say "nilmd: uninstall$([ "$PURGE" = 1 ] && echo " --purge")$([ "$DRY" = 1 ] && echo " (dry run: nothing will be changed)")"
  uninstall_template
  uninstall
else
  say "nilmd: install from $SRC$([ "$DRY" = 1 ] && echo " (dry run: nothing will be changed)")"
  FLAVOR=""
  packages
  user
  directories
  venv
  torch_step
  nilmd_step
  onnxruntime_step
  journal_step
  checkpoints_step
  config_step
  unit_step
  template_step
  service_step
  instances_step
fi
echo
if [ "$CHANGES" = 0 ] && [ "$UNINSTALL" = 1 ]; then
  say "nothing changed: nothing of nilmd's was left to remove."
elif [ "$CHANGES" = 0 ]; then
  say "nothing changed: everything was already in place ($UNCHANGED checks)."
elif [ "$DRY" = 1 ]; then
  say "dry run: $CHANGES changes would be made; nothing was changed."
else
  say "done: $CHANGES changes, $UNCHANGED already in place."
  [ "$UNINSTALL" = 1 ] || say "logs: journalctl -u nilmd    settings: $CONF_DIR/nilmd.env    status: systemctl status nilmd"
fi

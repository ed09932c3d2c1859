#!/usr/bin/env bash
# Separate hypervisor hosts on one machine for the host-failure tests (tests/hosts/):
#
#   test-hosts.sh up N        users vbh1..vbhN and their namespaces, links and session libvirtd
#   test-hosts.sh down        remove all of it: processes, namespaces, links, users, folders
#   test-hosts.sh run I CMD   run CMD as host I (user vbhI inside namespace vbnsI)
#
# Each host is an unprivileged user in group kvm whose own qemu:///session libvirtd runs its
# own KVM guests (docs: /work/shared/HOST.md items 12-13), inside its own network namespace
# vbnsI. A veth pair joins each namespace to the bridge vbbr0 in the root namespace, where
# the broker listens at 198.18.0.1; host I is 198.18.0.(10+I). 198.18.0.0/15 is reserved for
# benchmark networks, and no namespace has a route beyond that /24. A partition is the root
# end vbvI going down.
#
# The hosts share $BASE/shared (group vbhosts, setgid): disks there are the "shared storage",
# and libvirt's lockd plugin keeps its indirect lockspace there, so that a second QEMU on a
# disk in use fails to start. Tests list the root processes they start for the hosts (their
# brokers) in $BASE/pids, so that `down` ends them too after a run that was killed. Both
# commands are idempotent. Needs root.
set -euo pipefail

BASE=/var/lib/virtbroker-test
SHARED=$BASE/shared
LOCKSPACE=$SHARED/lockspace
ACL_RECORD=$BASE/acl-dirs  # folders given group vbhosts search (x) permission by `up`
PIDS=$BASE/pids            # root processes the tests started for these hosts (brokers), one pid a line
RUNTIME=/run/vbh           # RUNTIME/UID is each host user's XDG_RUNTIME_DIR
GROUP=vbhosts
BRIDGE=vbbr0
BRIDGE_ADDR=198.18.0.1/24
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=$ROOT/.venv/bin/python

die() { echo "test-hosts: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must run as root (it makes users, namespaces and links)"

host_user() { echo "vbh$1"; }
host_ns() { echo "vbns$1"; }
host_addr() { echo "198.18.0.$((10 + $1))"; }

# Every host user (vbh1, vbh2, ...), whatever N the last `up` had.
host_users() { getent passwd | cut -d: -f1 | grep -E '^vbh[0-9]+$' || true; }
host_namespaces() { ip netns list | awk '{print $1}' | grep -E '^vbns[0-9]+$' || true; }

# run_as I CMD...: CMD as host I, inside its namespace, with its own runtime dir and home.
run_as() {
  local i=$1; shift
  local user uid
  user=$(host_user "$i")
  uid=$(id -u "$user")
  ip netns exec "$(host_ns "$i")" runuser -u "$user" -- \
    env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME="/home/$user" USER="$user" \
    XDG_RUNTIME_DIR="$RUNTIME/$uid" "$@"
}

# pids_of_uid UID: every process whose real uid is UID.
pids_of_uid() {
  local status pid
  for status in /proc/[0-9]*/status; do
    pid=${status#/proc/}; pid=${pid%/status}
    awk -v uid="$1" '$1 == "Uid:" && $2 == uid {found = 1} END {exit !found}' "$status" 2>/dev/null && echo "$pid"
  done
  return 0
}

# kill_uid UID: SIGKILL each of the user's processes by pid, until none is left.
kill_uid() {
  local pids
  for _ in $(seq 1 100); do
    pids=$(pids_of_uid "$1")
    [[ -z $pids ]] && return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  die "processes of uid $1 did not exit: $(pids_of_uid "$1" | tr '\n' ' ')"
}

# The test user runs the project's interpreter: grant group vbhosts search permission on
# every folder above it (and above the tree) that others cannot enter, e.g. /root when the
# interpreter lives in /root/.pyenv. Search only: nothing there becomes listable.
grant_search() {
  local path dir
  touch "$ACL_RECORD"
  for path in "$(readlink -f "$PYTHON")" "$ROOT/virtbroker"; do
    dir=$(dirname "$path")
    while [[ $dir != / ]]; do
      if [[ $(stat -c %A "$dir") != *[xt] ]] && ! grep -qxF "$dir" "$ACL_RECORD"; then
        setfacl -m "g:$GROUP:x" "$dir"
        echo "$dir" >>"$ACL_RECORD"
      fi
      dir=$(dirname "$dir")
    done
  done
}

revoke_search() {
  [[ -f $ACL_RECORD ]] || return 0
  local dir
  while read -r dir; do
    [[ -e $dir ]] || continue
    setfacl -x "g:$GROUP" "$dir" 2>/dev/null || true
    # Nothing named left: drop the mask too, so the folder has its plain mode again.
    getfacl -cp "$dir" 2>/dev/null | grep -qE '^(user|group):[^:]+:' || setfacl -b "$dir"
  done <"$ACL_RECORD"
  rm -f "$ACL_RECORD"
}

make_network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$BRIDGE_ADDR" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

make_host() {
  local i=$1 user ns veth peer uid home
  user=$(host_user "$i"); ns=$(host_ns "$i"); veth="vbv$i"; peer="vbp$i"

  id "$user" >/dev/null 2>&1 || useradd -m -s /usr/sbin/nologin -G "kvm,$GROUP" "$user"
  usermod -a -G "kvm,$GROUP" "$user"
  uid=$(id -u "$user"); home=/home/$user
  chmod 0750 "$home"
  install -d -m 0755 "$RUNTIME"
  install -d -m 0700 -o "$user" -g "$user" "$RUNTIME/$uid"

  # The session daemon's QEMU driver takes disk leases through virtlockd (spawned per user
  # like libvirtd), in an indirect lockspace on the shared storage.
  install -d -m 0700 -o "$user" -g "$user" "$home/.config" "$home/.config/libvirt"
  printf '# scripts/test-hosts.sh\nlock_manager = "lockd"\n' >"$home/.config/libvirt/qemu.conf"
  printf '# scripts/test-hosts.sh\nauto_disk_leases = 1\nrequire_lease_for_disks = 1\nfile_lockspace_dir = "%s"\n' \
    "$LOCKSPACE" >"$home/.config/libvirt/qemu-lockd.conf"
  chown "$user:$user" "$home/.config/libvirt/qemu.conf" "$home/.config/libvirt/qemu-lockd.conf"

  ip netns list | awk '{print $1}' | grep -qxF "$ns" || ip netns add "$ns"
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip netns exec "$ns" ip link del "$peer" 2>/dev/null || true
    ip link add "$veth" type veth peer name "$peer"
    ip link set "$peer" netns "$ns"
  fi
  ip link set "$veth" master "$BRIDGE"
  ip link set "$veth" up
  ip -n "$ns" addr replace "$(host_addr "$i")/24" dev "$peer"
  ip -n "$ns" link set "$peer" up
  ip -n "$ns" link set lo up
}

# The user's session libvirtd (with its virtlogd and virtlockd) is spawned by its first
# client, inside the namespace of that client: here, the host's. About 5 s the first time.
start_daemon() {
  local i=$1
  for _ in 1 2 3; do
    run_as "$i" virsh -q -c qemu:///session version >/dev/null 2>&1 && return 0
    sleep 1
  done
  run_as "$i" virsh -c qemu:///session version >&2 || die "host $i: the session libvirtd of $(host_user "$i") does not answer"
}

up() {
  local count=${1:-}
  [[ $count =~ ^[1-9][0-9]?$ ]] || die "usage: test-hosts.sh up N (1 to 99 hosts)"
  [[ -x $PYTHON ]] || die "$PYTHON is missing (scripts/bootstrap.sh test makes it)"
  command -v setfacl >/dev/null || die "setfacl is missing (scripts/setup-host.sh installs acl)"
  getent group kvm >/dev/null || die "group kvm is missing (scripts/setup-host.sh makes it)"
  if [[ -e /dev/kvm && ( $(stat -c %G /dev/kvm) != kvm || $(( 0$(stat -c %a /dev/kvm) & 060 )) -ne 48 ) ]]; then
    die "/dev/kvm must be group kvm, mode 0660 (scripts/setup-host.sh sets it)"
  fi

  getent group "$GROUP" >/dev/null || groupadd "$GROUP"
  install -d -m 0755 "$BASE"
  install -d -m 2770 -g "$GROUP" "$SHARED" "$LOCKSPACE"
  grant_search
  make_network
  local i pids=()
  for i in $(seq 1 "$count"); do make_host "$i"; done
  for i in $(seq 1 "$count"); do start_daemon "$i" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid"; done
  echo "test-hosts: $count host(s) up: $(for i in $(seq 1 "$count"); do printf '%s@%s ' "$(host_user "$i")" "$(host_addr "$i")"; done)"
}

# kill_listed: the brokers a test run recorded in $PIDS and left running (it was killed),
# each only if that pid still runs virtbroker (pids are reused).
kill_listed() {
  [[ -f $PIDS ]] || return 0
  local pid
  while read -r pid; do
    [[ $pid =~ ^[0-9]+$ ]] || continue
    if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q 'virtbroker'; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done <"$PIDS"
  rm -f "$PIDS"
}

down() {
  local user uid ns i
  # Processes first: the brokers of a killed test run, then the users' daemons, QEMUs and
  # workers (userdel refuses while they run).
  kill_listed
  for user in $(host_users); do kill_uid "$(id -u "$user")"; done
  for ns in $(host_namespaces); do
    # shellcheck disable=SC2046
    kill -9 $(ip netns pids "$ns") 2>/dev/null || true
    ip netns del "$ns"
  done
  for i in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^vbv[0-9]+$' || true); do
    ip link del "$i" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  for user in $(host_users); do
    uid=$(id -u "$user")
    userdel -r "$user" 2>/dev/null || userdel "$user"
    rm -rf "/home/$user" "${RUNTIME:?}/$uid"
  done
  [[ -d $RUNTIME ]] && rmdir "$RUNTIME" 2>/dev/null || true
  revoke_search
  getent group "$GROUP" >/dev/null && groupdel "$GROUP"
  rm -rf "$BASE"
  echo "test-hosts: down"
}

case "${1:-}" in
  up) up "${2:-}" ;;
  down) down ;;
  run)
    [[ ${2:-} =~ ^[0-9]+$ && $# -ge 3 ]] || die "usage: test-hosts.sh run I COMMAND..."
    i=$2; shift 2
    run_as "$i" "$@"
    ;;
  *) die "usage: test-hosts.sh up N | down | run I COMMAND..." ;;
esac

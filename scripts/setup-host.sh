#!/usr/bin/env bash
# Install and start everything virtbroker's tests use on a Debian 12 host: libvirt with its
# QEMU driver, QEMU, apparmor_parser, the libvirt-qemu user, /dev/kvm access, virtlogd and
# libvirtd. Safe to run again: every step checks first. Needs root.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  echo "setup-host.sh: must run as root (it installs packages and starts libvirtd)" >&2
  exit 1
fi

packages=(
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
  qemu-system-x86 qemu-utils apparmor attr gcc python3-dev python3-venv procps etcd-server etcd-client
  systemd  # systemd-analyze, for the test of configs/systemd (works without systemd as PID 1)
  virtinst  # virt-install, for the tests of the libvirt gateway
  acl  # setfacl: scripts/test-hosts.sh lets the test hosts' users reach the project's interpreter
  iproute2  # ip netns, veth pairs and the bridge of scripts/test-hosts.sh
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-host: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirtd's QEMU driver refuses to load without its user and folders.
getent group kvm >/dev/null || groupadd -r kvm
id libvirt-qemu >/dev/null 2>&1 || useradd -r -s /usr/sbin/nologin -G kvm libvirt-qemu
usermod -a -G kvm libvirt-qemu
mkdir -p /var/log/libvirt /run/libvirt /var/lib/libvirt

# What udev does on a normal host: /dev/kvm for group kvm.
if [[ -e /dev/kvm ]]; then
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi

# virtlogd before libvirtd: a guest start needs its socket. Under supervisord these run
# in the foreground instead (configs/supervisord.conf). A daemon that is still shutting
# down shows up in pgrep but will not answer, so wait for it to go before starting anew.
libvirtd_answers() { virsh -c qemu:///system version >/dev/null 2>&1; }

# wait_for SECONDS COMMAND...: run COMMAND every 0.1 s until it succeeds or time runs out.
wait_for() {
  local tries=$(($1 * 10)); shift
  for _ in $(seq 1 "$tries"); do "$@" && return 0; sleep 0.1; done
  return 1
}
virtlogd_ready() { pgrep -x virtlogd >/dev/null && [[ -S /run/libvirt/virtlogd-sock ]]; }
not_running() { ! pgrep -x "$1" >/dev/null; }

if ! virtlogd_ready; then
  wait_for 10 virtlogd_ready || { wait_for 10 not_running virtlogd; virtlogd -d; }
  wait_for 10 virtlogd_ready || { echo "setup-host: virtlogd did not start" >&2; exit 1; }
fi
if ! libvirtd_answers; then
  # One that is starting up will answer soon; one that is stopping will exit.
  if pgrep -x libvirtd >/dev/null && ! wait_for 10 libvirtd_answers; then
    wait_for 20 not_running libvirtd || { echo "setup-host: a libvirtd is running but does not answer" >&2; exit 1; }
  fi
  if ! libvirtd_answers; then
    libvirtd -d
    wait_for 30 libvirtd_answers || { echo "setup-host: libvirtd did not answer within 30 s" >&2; exit 1; }
  fi
fi
echo "setup-host: libvirtd ready ($(virsh -c qemu:///system version | grep -m1 'Running hypervisor' || true))"

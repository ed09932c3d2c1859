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
  qemu-system-x86 qemu-utils apparmor attr gcc python3-dev python3-venv procps
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
# in the foreground instead (configs/supervisord.conf).
if ! pgrep -x virtlogd >/dev/null; then
  virtlogd -d
fi
if ! pgrep -x libvirtd >/dev/null; then
  libvirtd -d
fi
for _ in $(seq 1 100); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.1
done
virsh -c qemu:///system version >/dev/null
echo "setup-host: libvirtd ready ($(virsh -c qemu:///system version | grep -m1 'Running hypervisor' || true))"

#!/usr/bin/env bash
# The main job: set up, then define, start, list and destroy 20 guests on the embedded
# test hypervisor (no libvirtd needed) and print a summary with timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test
exec .venv/bin/virtbroker demo "$@"

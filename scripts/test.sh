#!/usr/bin/env bash
# The whole test suite: install and start libvirtd, virtlogd and what the tests use, set up
# the virtual environment, then run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
bash scripts/bootstrap.sh test
exec .venv/bin/python -m pytest "$@"

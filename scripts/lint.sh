#!/usr/bin/env bash
# ruff and mypy over the project, as CI runs them before the tests. Sets up .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test >/dev/null
.venv/bin/ruff check .
# mypy checks the package as it is installed (virtbroker.broker, ...), while the repository
# keeps one folder per part (setup.cfg's package_dir): it reads a tree of links to them.
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/virtbroker"
ln -s "$PWD/virtbroker/__init__.py" "$tree/virtbroker/__init__.py"
for part in broker client common gateway launcher workers; do
  ln -s "$PWD/$part" "$tree/virtbroker/$part"
done
root=$PWD
(cd "$tree" && "$root/.venv/bin/mypy" --config-file "$root/setup.cfg" --python-executable "$root/.venv/bin/python" -p virtbroker)

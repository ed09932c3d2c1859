"""What `pip install .` gives a user: one import package, virtbroker, and nothing else at the top."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile

from tests.procs import ROOT

GENERIC_NAMES = ("common", "client", "broker", "workers", "launcher")


def test_a_fresh_install_has_one_import_package(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = wheels.glob("virtbroker-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert zf.read(top_level).decode().split() == ["virtbroker"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"virtbroker"}

    # An empty venv with only this wheel; its dependencies come from the test venv's
    # site-packages on PYTHONPATH (a path entry, so the test venv's own editable install,
    # a .pth file, is not seen).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = (
        "import importlib.util, virtbroker\n"
        "from virtbroker import Client\n"
        "print(virtbroker.__version__, Client.__module__, virtbroker.__file__)\n"
        f"print([n for n in {GENERIC_NAMES!r} if importlib.util.find_spec(n) is not None])\n"
    )
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=str(tmp_path), timeout=60,
                          env={"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    version, module, path = done.stdout.splitlines()[0].split()
    assert version[0].isdigit() and module == "virtbroker.client.api" and path.startswith(str(venv))
    assert done.stdout.splitlines()[1] == "[]"

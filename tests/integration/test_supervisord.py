"""configs/supervisord.conf runs the broker and its workers, and stops every program cleanly."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml
from tests.procs import ROOT


def test_supervisord_runs_broker_and_workers_and_stops_them(tmp_path):
    conf_dir = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", conf_dir)
    ini = configparser.ConfigParser()
    ini.read(conf_dir / "virtbroker.ini")
    ini["virtbroker"]["state_dir"] = str(tmp_path / "state")
    ini["virtbroker"]["uri"] = "test:///default"
    with open(conf_dir / "virtbroker.ini", "w") as f:
        ini.write(f)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    log = open(tmp_path / "supervisord.log", "wb")
    sup = subprocess.Popen(
        [str(Path(sys.executable).parent / "supervisord"), "-c", str(conf_dir / "supervisord.conf")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        with Client(f"ipc://{tmp_path}/state/client.sock", timeout_s=10) as c:
            deadline = time.monotonic() + 60
            workers = 0
            while time.monotonic() < deadline and workers < 4:
                try:
                    workers = c.ping(timeout_s=1)["workers"]
                except Exception:
                    time.sleep(0.2)
            assert workers == 4, (tmp_path / "supervisord.log").read_text()[-3000:]
            c.define(minimal_domain_xml("supervised"))
            assert c.run("supervised", "start", 30)["state"] == "succeeded"
            assert c.run("supervised", "destroy", 30)["state"] == "succeeded"
        children = subprocess.run(["pgrep", "-P", str(sup.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 5  # broker + 4 workers
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=60) == 0
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        text = (tmp_path / "supervisord.log").read_text()
        assert "stopped: broker (exit status 0)" in text
        assert text.count("stopped: worker-") == 4 and "(terminated by SIGKILL" not in text
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()

"""configs/supervisord.conf runs the broker and its workers, and stops every program cleanly."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.procs import ROOT
from tests.waiting import wait_until
from virtbroker.client.api import Client
from virtbroker.client.templates import minimal_domain_xml


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
            def workers() -> int:
                try:
                    return c.ping(timeout_s=1)["workers"]
                except Exception:  # the broker is not up yet
                    return 0

            try:
                wait_until(lambda: workers() >= 4, 60, interval_s=0.2, what="4 workers under supervisord")
            except AssertionError as e:
                raise AssertionError((tmp_path / "supervisord.log").read_text()[-3000:]) from e
            c.define(minimal_domain_xml("supervised"))
            assert c.run("supervised", "start", 30)["state"] == "succeeded"
            assert c.run("supervised", "destroy", 30)["state"] == "succeeded"
        # The libvirt gateway program serves virsh on the same registry.
        sock = tmp_path / "state" / "libvirt-sock"
        listed = wait_until(lambda: subprocess.run(
            ["virsh", "-c", f"qemu+unix:///system?socket={sock}", "list", "--all", "--name"],
            capture_output=True, text=True, timeout=30,
        ).stdout.split(), 30, interval_s=0.2, what="virsh through the gateway")
        assert "supervised" in listed
        children = subprocess.run(["pgrep", "-P", str(sup.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 6  # broker, libvirt gateway, 4 workers
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=60) == 0
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        text = (tmp_path / "supervisord.log").read_text()
        assert "stopped: broker (exit status 0)" in text
        assert "stopped: libvirt-gateway (exit status 0)" in text
        assert text.count("stopped: worker-") == 4 and "(terminated by SIGKILL" not in text
    finally:
        if sup.poll() is None:
            # A failed test: its programs must not outlive it (SIGKILL of supervisord alone
            # would leave them running).
            left = subprocess.run(["pgrep", "-P", str(sup.pid)], capture_output=True, text=True).stdout.split()
            sup.kill()
            sup.wait()
            for pid in left:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

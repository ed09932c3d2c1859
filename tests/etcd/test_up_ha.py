"""`virtbroker up --ha` and `virtbroker demo --ha` as an operator runs them: real etcd members,
two brokers and workers under `up`; kill -9 of the leading broker; nothing left running after."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid as uuidlib
from pathlib import Path

from tests.procs import ROOT, Proc
from tests.waiting import wait_until
from virtbroker import Client
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common.errors import VirtbrokerError


def etcd_pids(under: str) -> list[int]:
    """etcd processes whose data dir lies under `under` (the ones this test started, through up)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"/etcd") or a == b"etcd" for a in argv) and any(a.startswith(under.encode()) for a in argv):
            pids.append(int(entry.name))
    return pids


def kill_left_etcd(under: str) -> list[int]:
    """SIGKILL what is left of our etcd members; returns their pids (empty: nothing was left)."""
    left = etcd_pids(under)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def leader_of(urls: list[str]) -> tuple[str, dict] | None:
    """The broker that says it leads: (its client URL, its ping), or None."""
    for url in urls:
        try:
            with Client(url, timeout_s=1.0) as c:
                status = c.ping(timeout_s=1.0)
        except VirtbrokerError:
            continue
        if status["role"] == "leader":
            return url, status
    return None


def test_up_ha_serves_through_its_client_urls_and_survives_kill9_of_its_leader(tmp_path):
    state_dir = tmp_path / "s"
    left: list[int] = []
    up = Proc("up", [sys.executable, "-m", "virtbroker.launcher", "up", "--ha", "--state-dir", str(state_dir),
                     "--workers", "1"], tmp_path).start()
    try:
        said = wait_until(lambda: re.search(r"clients connect at (\S+) ", up.log()) or (not up.alive() and up.log()[-3000:]),
                          timeout_s=60, what="up --ha names its client URLs")
        assert isinstance(said, re.Match), said
        urls = said.group(1).split(",")
        assert urls == [f"ipc://{state_dir}/broker-a/client.sock", f"ipc://{state_dir}/broker-b/client.sock"]
        wait_until(lambda: (leader_of(urls) or (None, {}))[1].get("workers", 0) >= 1, timeout_s=60,
                   what="a broker leads with the worker")
        _, status = leader_of(urls)
        defined = {}
        with Client(said.group(1), timeout_s=30) as c:  # the list, as up printed it
            for i in range(10):
                name, uuid = f"ha-up-{i}", str(uuidlib.uuid4())
                c.define(minimal_domain_xml(name, uuid=uuid))
                defined[name] = uuid
            assert c.run("ha-up-0", "start", 60)["state"] == "succeeded"
            os.kill(int(status["leader"]["broker_id"].rpartition("/")[2]), signal.SIGKILL)
            # The client follows whichever broker leads next (the standby, or the killed one
            # that up started again on the same URLs); nothing acknowledged is lost.
            c.define(minimal_domain_xml("ha-up-after"))
            _, new_status = wait_until(lambda: leader_of(urls), timeout_s=20, what="a leader after the kill")
            assert new_status["leader"]["broker_id"] != status["leader"]["broker_id"] and new_status["takeovers"] >= 1
            listed = {d["name"]: d for d in c.list(all=True)}
            assert {name: listed[name]["uuid"] for name in defined} == defined
            assert listed["ha-up-0"]["state"] == "running"
            assert c.run("ha-up-0", "destroy", 60)["state"] == "succeeded"  # the worker follows too
        # up started the killed broker again, and it stands by.
        wait_until(lambda: "broker-" in up.log() and "started again" in up.log(), timeout_s=20,
                   what="up restarts the killed broker")
        code = up.stop(timeout_s=90)
        assert code == 0, up.log()[-3000:]
        assert not etcd_pids(str(state_dir)), "an etcd member outlived up"
        # The operator's data stays: etcd's data dirs and layout, each broker's state dir.
        assert (state_dir / "etcd" / "cluster.json").exists() and (state_dir / "etcd" / "m0" / "member").is_dir()
        assert (state_dir / "broker-a").is_dir() and (state_dir / "broker-b").is_dir()
    finally:
        left = stop_all(up, str(state_dir))
    assert not left, f"etcd members {left} were left running"


def stop_all(up: Proc, state_dir: str) -> list[int]:
    """Stop up if it still runs (SIGTERM: it stops its children, etcd last), give etcd members
    time to exit, and kill what is left; returns the pids that were left."""
    if up.alive():
        up.stop(timeout_s=90)
    try:
        wait_until(lambda: not etcd_pids(state_dir), timeout_s=15, what="etcd members exit")
        return []
    except AssertionError:
        return kill_left_etcd(state_dir)


def test_demo_ha_exits_0_and_prints_the_takeover_time(tmp_path):
    demo = subprocess.Popen(
        [sys.executable, "-m", "virtbroker.launcher", "demo", "--ha", "--guests", "5", "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT),
        env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
    )
    out = ""
    left: list[int] = []
    try:
        out, _ = demo.communicate(timeout=240)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)  # the demo, its up; up's children follow (pdeathsig)
            out += demo.communicate()[0]
        found = re.search(r"\(log: (/tmp/vb-ha-[^/]+)/virtbroker.log\)", out)
        if found:
            try:
                wait_until(lambda: not etcd_pids(found.group(1)), timeout_s=15, what="the demo's etcd members exit")
            except AssertionError:
                left = kill_left_etcd(found.group(1))
    assert demo.returncode == 0, out[-3000:]
    assert re.search(r"takeover: \d+ ms from the kill to the first acknowledged define", out), out[-3000:]
    assert "all 5 guests defined before the kill are there" in out
    assert found and not Path(found.group(1)).exists(), "the demo's state dir was left behind"
    assert not left, f"etcd members {left} outlived the demo"

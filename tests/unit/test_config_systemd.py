"""configs/systemd: the unit files, by a strict check of our own everywhere and by
`systemd-analyze verify` where it is installed (it needs no systemd as PID 1)."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.procs import ROOT
from virtbroker.launcher import cli

UNITS_DIR = ROOT / "configs" / "systemd"
CONFIG_PATH = "/etc/virtbroker/virtbroker.ini"
# unit file -> an instance to verify it as, and the supervisord program that runs the same process
UNITS = {
    "virtbroker-broker.service": ("virtbroker-broker.service", "broker"),
    "virtbroker-broker-ha.service": ("virtbroker-broker-ha.service", "broker-ha"),
    "virtbroker-worker@.service": ("virtbroker-worker@vm-01.service", "worker"),
    "virtbroker-security@.service": ("virtbroker-security@dac.service", "security-dac"),
    "virtbroker-libvirt-gateway.service": ("virtbroker-libvirt-gateway.service", "libvirt-gateway"),
}
KNOWN_KEYS = {
    "Unit": {"Description", "After", "Before", "Wants", "Requires", "PartOf", "Documentation"},
    "Service": {"Type", "ExecStart", "Restart", "RestartSec", "RestartPreventExitStatus", "KillSignal", "KillMode",
                "TimeoutStopSec"},
    "Install": {"WantedBy"},
}
BROKERS = {"virtbroker-broker.service", "virtbroker-broker-ha.service"}
REPEATABLE = {"After", "Before", "Wants", "Requires", "WantedBy"}
RESTART_VALUES = {"no", "always", "on-success", "on-failure", "on-abnormal", "on-abort", "on-watchdog"}
SPECIFIERS = {"%i", "%H", "%%"}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}}, refusing what systemd would only warn about:
    an unknown section or key, a key outside a section, a repeated single-valued key."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            assert line.endswith("]") and line[1:-1] in KNOWN_KEYS, f"line {number}: unknown section {line}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {number}: a key before any section"
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        assert sep and value, f"line {number}: not Key=Value: {line}"
        section = next(s for s, keys in sections.items() if keys is current)
        assert key in KNOWN_KEYS[section], f"line {number}: unknown key {key} in [{section}]"
        assert key in REPEATABLE or key not in current, f"line {number}: {key} given twice"
        for spec in re.findall(r"%.", value):
            assert spec in SPECIFIERS, f"line {number}: specifier {spec} (only {', '.join(sorted(SPECIFIERS))})"
        current.setdefault(key, []).append(value)
    return sections


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min)?", value)
    assert match, f"not a time span this check knows: {value}"
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def supervisord_stopwaitsecs() -> dict[str, float]:
    parser = configparser.RawConfigParser()
    parser.read(ROOT / "configs" / "supervisord.conf")
    return {s.split(":", 1)[1]: float(parser[s]["stopwaitsecs"]) for s in parser.sections() if s.startswith("program:")}


def test_the_units_are_the_ones_documented():
    assert sorted(p.name for p in UNITS_DIR.iterdir()) == sorted(UNITS)


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_a_unit_passes_the_strict_check(unit):
    sections = parse_unit((UNITS_DIR / unit).read_text())
    service = sections["Service"]
    one = {key: values[0] for key, values in service.items()}
    assert sections["Unit"]["Description"] and sections["Install"]["WantedBy"] == ["multi-user.target"]
    assert one["Type"] == "simple"  # stays in the foreground, logs to stderr (the journal)
    assert one["Restart"] in RESTART_VALUES - {"no"}
    assert one["RestartPreventExitStatus"] == str(cli.EXIT_USAGE)  # a config error does not heal
    assert one["KillSignal"] == "SIGTERM" and one["KillMode"] == "mixed"
    after = " ".join(sections["Unit"]["After"]).split()
    assert {"libvirtd.service", "virtlogd.service"} <= set(after)
    if unit not in BROKERS:
        assert "virtbroker-broker.service" in after  # so it is stopped before the broker
    # TimeoutStopSec covers the 30 s a worker finishes its jobs in, as supervisord's
    # stopwaitsecs for the same program and `up`'s wait do.
    timeout_s = seconds(one["TimeoutStopSec"])
    assert timeout_s == supervisord_stopwaitsecs()[UNITS[unit][1]]
    if unit not in BROKERS:
        assert timeout_s == cli.STOP_WAIT_S and timeout_s > 30


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_a_units_command_is_a_valid_virtbroker_command_line(unit):
    """ExecStart, with its specifiers filled in, parses with virtbroker's own parser, and its
    configuration (the shipped ini in place of /etc/virtbroker's) loads."""
    service = parse_unit((UNITS_DIR / unit).read_text())["Service"]
    instance = UNITS[unit][0].partition("@")[2].removesuffix(".service")
    argv = shlex.split(service["ExecStart"][0].replace("%i", instance).replace("%H", socket.gethostname()))
    assert argv[0] == "/usr/local/bin/virtbroker"
    assert argv[-2:] == ["-c", CONFIG_PATH]
    args = cli.build_parser().parse_args([*argv[1:-1], str(ROOT / "configs" / "virtbroker.ini")])
    assert args.command == {"broker": "broker", "broker-ha": "broker", "worker": "worker",
                            "security-dac": "security-worker", "libvirt-gateway": "libvirt-gateway"}[UNITS[unit][1]]
    if args.command == "worker":
        assert args.worker_id == instance
    if args.command == "security-worker":
        assert args.driver == instance
    config = cli._config(args)
    assert config.uri == "qemu:///system"
    if UNITS[unit][1] == "broker-ha":
        # A second broker on the host: its own state dir (lock, sockets), the etcd store.
        assert config.store.startswith("etcd://") and config.state_dir == "/var/lib/virtbroker/broker-ha"


def test_the_standby_broker_of_systemd_and_supervisord_is_the_same_command():
    """virtbroker-broker-ha.service and supervisord's broker-ha program run the same broker
    (the same options before the config file), and supervisord does not start it by default."""
    unit = parse_unit((UNITS_DIR / "virtbroker-broker-ha.service").read_text())["Service"]["ExecStart"][0]
    parser = configparser.RawConfigParser()
    parser.read(ROOT / "configs" / "supervisord.conf")
    program = parser["program:broker-ha"]
    assert program["autostart"] == "false"
    assert shlex.split(unit)[1:-2] == shlex.split(program["command"])[1:-2]


def test_the_strict_check_refuses_a_misspelt_unit():
    good = (UNITS_DIR / "virtbroker-broker.service").read_text()
    for broken, message in [
        (good.replace("Restart=always", "Restrat=always"), "unknown key Restrat"),
        (good.replace("[Service]", "[Servce]"), "unknown section"),
        (good.replace("Type=simple", "Type=simple\nType=notify"), "Type given twice"),
        (good.replace("broker -c", "broker --id %I -c"), "specifier %I"),
    ]:
        with pytest.raises(AssertionError, match=message):
            parse_unit(broken)


def systemd_root(tmp_path: Path, units: dict[str, str]) -> Path:
    """A root for `systemd-analyze verify --root`: the host's stock units (sysinit.target and
    the like, which every service depends on by default), ours, and a stand-in for
    /usr/local/bin/virtbroker, whose existence verify checks."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_text(text)
    binary = root / "usr/local/bin/virtbroker"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return root


def verify(root: Path) -> subprocess.CompletedProcess:
    instances = [instance for instance, _ in UNITS.values()] + ["virtbroker-security@apparmor.service"]
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", *instances], check=False, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not Path("/usr/lib/systemd/system").is_dir(),
                    reason="systemd-analyze is not installed (Debian package systemd; scripts/setup-host.sh installs it)")
def test_systemd_analyze_verify_finds_nothing(tmp_path):
    units = {name: (UNITS_DIR / name).read_text() for name in UNITS}
    done = verify(systemd_root(tmp_path / "ours", units))
    # verify exits 0 on a value it ignores (a misspelt Type=, say) and only prints a line:
    # any output at all is a failure.
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr
    # The same check on a broken copy speaks, so its silence above means something.
    units["virtbroker-broker.service"] = units["virtbroker-broker.service"].replace("Type=simple", "Type=simplest")
    broken = verify(systemd_root(tmp_path / "broken", units))
    assert "Failed to parse service type" in broken.stdout + broken.stderr

"""Config's fields as the one source of the ini keys, the command-line options and the checks:
every field reachable from both with its type, today's option spellings, one-line refusals."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from virtbroker.common.config import DEFAULT_DEADLINES_S, Config, config_fields, field_type, option_flags
from virtbroker.common.errors import ConfigError
from virtbroker.launcher import cli

COMMANDS = ("up", "broker", "worker", "security-worker", "libvirt-gateway")
REQUIRED = {"security-worker": ["--driver", "dac"]}


def samples(tmp_path) -> dict:
    """A value for every field, none of them its default, all valid together."""
    return {
        "state_dir": str(tmp_path / "state"),
        "client_url": f"ipc://{tmp_path}/c.sock",
        "worker_url": f"ipc://{tmp_path}/w.sock",
        "events_url": f"ipc://{tmp_path}/e.sock",
        "local_url": f"unix://{tmp_path}/l.sock",
        "libvirt_url": f"unix://{tmp_path}/libvirt-sock",
        "libvirt_readonly_url": f"unix://{tmp_path}/libvirt-sock-ro",
        "uri": "qemu:///system",
        "workers": 5,
        "slots": 7,
        "priority_slots": 2,
        "lease_ttl_s": 12.5,
        "heartbeat_interval_s": 2.5,
        "resync_interval_s": 7.5,
        "shutdown_timeout_s": 30.5,
        "host_dead_s": 40.5,
        "self_fence_s": 25.5,
        "partition_fraction": 0.75,
        "fence_quiet_s": 90.5,
        "fence_margin_s": 12.5,
        "fence_command": "/usr/local/sbin/fence-host",
        "fence_retry_s": 5.5,
        "queue_timeout_s": 45.5,
        "shared_storage_roots": ["/srv/shared", "/srv/shared2"],
        "watchdog_device": "/dev/watchdog",
        "security": ["dac", "apparmor"],
        "guest_user": "vbguest:kvm",
        "storage_roots": ["/srv/images", "/srv/more"],
        "serialization": "global",
        "security_slots": 3,
        "allowed_emulators": ["/usr/bin/qemu-system-x86_64"],
        "readonly_url": f"ipc://{tmp_path}/ro.sock",
        "curve_dir": str(tmp_path / "curve"),
        "curve_server_key": str(tmp_path / "server.key"),
        "curve_secret_key": str(tmp_path / "worker.key_secret"),
        "job_history": 50,
        "event_history": 60,
        "store": "etcd://127.0.0.1:2379,127.0.0.1:2381",
        "etcd_prefix": "/vb-test/",
        "leader_ttl_s": 3.5,
        "store_timeout_s": 1.5,
        "metrics_port": 9100,
        "metrics_addr": "0.0.0.0",
        "log_level": "DEBUG",
        "realtime_priority": 10,
        "allow_insecure_tcp": True,
        "max_domains": 11,
        "max_queued_jobs": 12,
        "max_queued_jobs_per_domain": 13,
        "deadline_s": {"start": 10.0, "destroy": 20.5},
        "startsecs_s": 2.5,
        "startretries": 5,
    }


def ini_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(value)
    if isinstance(value, dict):
        return ", ".join(f"{op}:{s:g}" for op, s in value.items())
    return str(value)


def cli_args(flag: str, value) -> list[str]:
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + flag[2:]]
    if isinstance(value, list):
        return [arg for item in value for arg in (flag, item)]
    if isinstance(value, dict):
        return [arg for op, s in value.items() for arg in (flag, f"{op}:{s:g}")]
    return [flag, str(value)]


def expected(name: str, value):
    return {**DEFAULT_DEADLINES_S, **value} if name == "deadline_s" else value


def test_every_field_has_help_a_type_and_a_sample(tmp_path):
    assert set(samples(tmp_path)) == {f.name for f in fields(Config)}, "give a new field a sample above"
    for f in fields(Config):
        assert f.metadata.get("help"), f"{f.name}: declare it with option(..., help=...)"
        assert field_type(f) in (str, int, float, bool, list[str], dict[str, float]), f.name


def test_every_field_is_read_from_the_ini_with_its_type(tmp_path):
    values = samples(tmp_path)
    path = tmp_path / "virtbroker.ini"
    path.write_text("[virtbroker]\n" + "".join(f"{k} = {ini_text(v)}\n" for k, v in values.items()))
    config = Config.load(str(path))
    for name, value in values.items():
        got = getattr(config, name)
        assert got == expected(name, value) and type(got) is type(value), name


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_an_option_with_its_type(tmp_path, command):
    values = samples(tmp_path)
    taken = {f.name for f in config_fields(command)}
    argv = [command, *REQUIRED.get(command, [])]
    for f in config_fields(command):
        argv += cli_args(option_flags(f)[-1], values[f.name])
    config = cli._config(cli.build_parser().parse_args(argv))
    for name in taken:
        got = getattr(config, name)
        assert got == expected(name, values[name]) and type(got) is type(values[name]), name
    if command != "up":  # what only `up` takes is not an option of the others
        assert {"workers", "startsecs_s", "startretries"}.isdisjoint(taken)


@pytest.mark.parametrize("field_name", [f.name for f in fields(Config) if len(option_flags(f)) > 1])
def test_the_short_and_the_full_spelling_set_the_same_field(tmp_path, field_name):
    f = next(f for f in fields(Config) if f.name == field_name)
    value = samples(tmp_path)[field_name]
    got = [getattr(cli._config(cli.build_parser().parse_args(["up", *cli_args(flag, value)])), field_name)
           for flag in option_flags(f)]
    assert got[0] == got[1] == expected(field_name, value)


def test_options_spelled_as_before(tmp_path):
    argv = [
        "up", "--state-dir", str(tmp_path), "--lease-ttl", "4", "--resync-interval", "2",
        "--uri", "qemu:///system", "--security", "dac,apparmor", "--guest-user", "vbguest:kvm",
        "--storage-root", "/srv/a", "--storage-root", "/srv/b", "--deadline", "start:30",
        "--deadline", "destroy:5,suspend:7", "--allowed-emulator", "/usr/bin/qemu-a",
        "--allowed-emulator", "/usr/bin/qemu-b", "--workers", "3", "--slots", "2", "--allow-insecure-tcp",
    ]
    config = cli._config(cli.build_parser().parse_args(argv))
    assert config.lease_ttl_s == 4.0 and config.heartbeat_interval_s == 1.0 and config.resync_interval_s == 2.0
    assert config.security == ["dac", "apparmor"]
    assert config.storage_roots == ["/srv/a", "/srv/b"]
    assert config.deadline_s == {**DEFAULT_DEADLINES_S, "start": 30.0, "destroy": 5.0, "suspend": 7.0}
    assert config.allowed_emulators == ["/usr/bin/qemu-a", "/usr/bin/qemu-b"]
    assert (config.workers, config.slots, config.allow_insecure_tcp) == (3, 2, True)


def test_the_command_line_overrides_the_ini_and_deadlines_merge(tmp_path):
    path = tmp_path / "virtbroker.ini"
    path.write_text("[virtbroker]\nslots = 9\nallow_insecure_tcp = yes\nstorage_roots = /srv/a\n"
                    "deadline_s = start:100, destroy:50\n")
    argv = ["broker", "-c", str(path), "--state-dir", str(tmp_path), "--slots", "3", "--no-allow-insecure-tcp",
            "--storage-root", "/srv/b", "--deadline", "destroy:9"]
    config = cli._config(cli.build_parser().parse_args(argv))
    assert config.slots == 3 and config.allow_insecure_tcp is False and config.storage_roots == ["/srv/b"]
    assert config.deadline_s == {**DEFAULT_DEADLINES_S, "start": 100.0, "destroy": 9.0}
    unset = cli._config(cli.build_parser().parse_args(["broker", "-c", str(path), "--state-dir", str(tmp_path)]))
    assert unset.slots == 9 and unset.allow_insecure_tcp is True and unset.storage_roots == ["/srv/a"]


BAD = [
    ("lease_ttl_s", "nan", "not a finite number"),
    ("lease_ttl_s", "inf", "not a finite number"),
    ("lease_ttl_s", "-1", "more than 0"),
    ("lease_ttl_s", "0", "more than 0"),
    ("lease_ttl_s", "ten", "is not a number"),
    ("heartbeat_interval_s", "-0.5", "more than 0"),
    ("heartbeat_interval_s", "nan", "not a finite number"),
    ("heartbeat_interval_s", "20", "shorter than lease_ttl_s"),
    ("resync_interval_s", "0", "more than 0"),
    ("resync_interval_s", "-inf", "not a finite number"),
    ("shutdown_timeout_s", "-5", "more than 0"),
    ("shutdown_timeout_s", "infinity", "not a finite number"),
    ("startsecs_s", "nan", "not a finite number"),
    ("startsecs_s", "-1", "more than 0"),
    ("deadline_s", "start:nan", "between 0 and"),
    ("deadline_s", "start:inf", "between 0 and"),
    ("deadline_s", "destroy:-1", "between 0 and"),
    ("deadline_s", "start:0", "between 0 and"),
    ("deadline_s", "start:86401", "between 0 and"),
    ("deadline_s", "migrate:10", "unknown operation 'migrate'"),
    ("deadline_s", "start", "is not OP:SECONDS"),
    ("workers", "-1", "at least 0"),
    ("slots", "0", "at least 1"),
    ("slots", "2.5", "is not an integer"),
    ("security_slots", "0", "at least 1"),
    ("job_history", "0", "at least 1"),
    ("event_history", "0", "at least 1"),
    ("store", "etcd://nohost", "neither sqlite nor etcd"),
    ("leader_ttl_s", "nan", "not a finite number"),
    ("priority_slots", "-1", "at least 0"),
    ("max_domains", "0", "at least 1"),
    ("max_queued_jobs", "0", "at least 1"),
    ("max_queued_jobs_per_domain", "0", "at least 1"),
    ("metrics_port", "65536", "between 0 and 65535"),
    ("startretries", "-1", "at least 0"),
    ("security", "selinux", "unknown 'selinux'"),
    ("serialization", "none", "not one of per-resource, global"),
    ("log_level", "loud", "not one of DEBUG"),
    ("allow_insecure_tcp", "maybe", "not true or false"),
    ("local_url", "ipc:///tmp/x.sock", "must be unix:///ABSOLUTE/PATH"),
]


@pytest.mark.parametrize("key, text, message", BAD, ids=[f"{k}={t}" for k, t, _ in BAD])
def test_a_bad_ini_value_is_refused_in_one_line_naming_the_key(tmp_path, key, text, message):
    path = tmp_path / "virtbroker.ini"
    path.write_text(f"[virtbroker]\nstate_dir = {tmp_path}\n{key} = {text}\n")
    with pytest.raises(ConfigError) as refused:
        Config.load(str(path))
    assert key in str(refused.value) and message in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("key, text, message", [b for b in BAD if b[0] != "allow_insecure_tcp"],
                         ids=[f"{k}={t}" for k, t, _ in BAD if k != "allow_insecure_tcp"])
def test_a_bad_option_is_refused_in_one_line_naming_the_key(tmp_path, capsys, key, text, message):
    flag = option_flags(next(f for f in fields(Config) if f.name == key))[0]
    command = "up" if key in ("workers", "startsecs_s", "startretries") else "broker"
    # Refused before anything starts, so main() returns instead of running a broker.
    assert cli.main([command, "--state-dir", str(tmp_path), f"{flag}={text}"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("virtbroker: error: ") and key in err[0] and message in err[0], err


def test_the_cross_field_checks_still_hold(tmp_path):
    base = {"state_dir": str(tmp_path)}
    cases = [
        ({"security": "dac"}, "security drivers need a hypervisor"),
        ({"security": "dac", "uri": "qemu:///system"}, "dac security driver needs guest_user"),
        ({"security": "apparmor", "uri": "qemu:///system"}, "apparmor security driver needs at least one storage root"),
        ({"local_url": "unix:///" + "d" * 200}, "over 107 bytes"),
        ({"bogus_key": "1"}, "unknown config option(s): bogus_key"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Config.load(**base, **overrides)


def test_values_from_python_are_type_checked(tmp_path):
    with pytest.raises(ConfigError, match="slots: '4' is not an integer"):
        Config(state_dir=str(tmp_path), slots="4")
    with pytest.raises(ConfigError, match="lease_ttl_s: nan is not a finite"):
        Config(state_dir=str(tmp_path), lease_ttl_s=math.nan)
    with pytest.raises(ConfigError, match="allow_insecure_tcp: 1 is not true or false"):
        Config(state_dir=str(tmp_path), allow_insecure_tcp=1)
    config = Config(state_dir=str(tmp_path), lease_ttl_s=3, deadline_s={"start": 5})
    assert config.lease_ttl_s == 3.0 and type(config.lease_ttl_s) is float
    assert config.deadline_s["start"] == 5.0 and config.deadline_s["destroy"] == DEFAULT_DEADLINES_S["destroy"]
    assert config.finish() == config  # finish again changes nothing


def test_the_shipped_ini_loads(tmp_path):
    from tests.procs import ROOT

    config = Config.load(str(ROOT / "configs" / "virtbroker.ini"), state_dir=str(tmp_path))
    assert config.uri == "qemu:///system" and config.deadline_s == DEFAULT_DEADLINES_S

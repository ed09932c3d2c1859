"""Configuration shared by every process: defaults, the ini file, and command-line overrides."""

from __future__ import annotations

import configparser
import math
import os
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from virtbroker.common.errors import ConfigError
from virtbroker.common.stream import is_stream_url, stream_path

MAX_SOCKET_PATH_BYTES = 107  # sockaddr_un's sun_path, less its terminating NUL


def default_state_dir() -> str:
    env = os.environ.get("VIRTBROKER_STATE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/virtbroker"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "virtbroker")


def default_client_url() -> str:
    """Where clients find the broker when neither --connect nor VIRTBROKER_URL is given: its
    local endpoint in the default state dir, as virsh finds libvirtd's local socket."""
    return os.environ.get("VIRTBROKER_URL") or f"unix://{default_state_dir()}/local.sock"


# Per operation; see Config.deadline_s. A KVM start labels files, defines and boots (seconds on
# a loaded host); destroy waits for QEMU to exit.
DEFAULT_DEADLINES_S = {
    "start": 300.0,
    "shutdown": 120.0,
    "destroy": 120.0,
    "reboot": 120.0,
    "suspend": 60.0,
    "resume": 60.0,
    "reconcile": 60.0,
}
MAX_DEADLINE_S = 86400.0
SECURITY_DRIVERS = ("dac", "apparmor")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# A check takes a field's value (already of the field's type) and returns what is wrong with
# it, or None. Checks that need two fields live in Config.finish.
Check = Callable[[Any], "str | None"]


def duration(*, zero: str = "") -> Check:
    """Seconds: finite and positive; with zero="what 0 means", 0 is accepted too."""

    def check(seconds: float) -> str | None:
        if not math.isfinite(seconds):  # NaN and inf: every comparison would lie
            return f"{seconds} is not a finite number of seconds"
        if seconds < 0 or (seconds == 0 and not zero):
            return f"{seconds:g} must be more than 0 seconds" + (f" (or 0: {zero})" if zero else "")
        return None

    return check


def at_least(minimum: int, maximum: int | None = None) -> Check:
    def check(number: int) -> str | None:
        if maximum is not None and not minimum <= number <= maximum:
            return f"{number} must be between {minimum} and {maximum}"
        if number < minimum:
            return f"{number} must be at least {minimum}"
        return None

    return check


def one_of(*choices: str, upper: bool = False) -> Check:
    def check(value: str) -> str | None:
        if (value.upper() if upper else value) not in choices:
            return f"'{value}' is not one of {', '.join(choices)}"
        return None

    return check


def each_one_of(*choices: str) -> Check:
    def check(values: list[str]) -> str | None:
        bad = [v for v in values if v not in choices]
        return f"unknown {', '.join(repr(v) for v in bad)} ({', '.join(choices)})" if bad else None

    return check


def _check_store(store: str) -> str | None:
    if store == "sqlite":
        return None
    if not store.startswith("etcd://") or not all(
        host and port.isdigit() for host, _, port in (e.rpartition(":") for e in etcd_endpoints(store))
    ):
        return f"'{store}' is neither sqlite nor etcd://HOST:PORT[,HOST:PORT...]"
    return None


def etcd_endpoints(store: str) -> list[str]:
    """etcd://h1:p1,h2:p2 -> ["h1:p1", "h2:p2"]"""
    return [e.strip() for e in store[len("etcd://"):].split(",") if e.strip()]


def url_list(urls: str) -> list[str]:
    """A comma-separated list of broker URLs (clients and workers follow the leader among them)."""
    return [u.strip() for u in urls.split(",") if u.strip()]


def _check_local_url(url: str) -> str | None:
    if not is_stream_url(url) or not stream_path(url).startswith("/"):
        return f"must be unix:///ABSOLUTE/PATH, not '{url}'"
    if len(stream_path(url).encode()) > MAX_SOCKET_PATH_BYTES:
        return f"its path is over {MAX_SOCKET_PATH_BYTES} bytes, the limit of a UNIX socket: {url}"
    return None


def _check_deadlines(deadlines: dict[str, float]) -> str | None:
    for op, seconds in deadlines.items():
        if op not in DEFAULT_DEADLINES_S:
            return f"names unknown operation '{op}' ({', '.join(DEFAULT_DEADLINES_S)})"
        if not 0 < seconds <= MAX_DEADLINE_S:  # NaN fails too
            return f"{op}:{seconds:g} must be between 0 and {MAX_DEADLINE_S:g} seconds"
    return None


def option(default: Any = MISSING, *, help: str, check: Check | None = None, commands: tuple[str, ...] = (),
           metavar: str = "", default_factory: Any = MISSING) -> Any:
    """A Config field that carries its help and its check; its type is the annotation.

    The ini reader, the command-line options and the checks of Config.finish are all derived
    from these (see config_options and parse_value), so a field is declared in one place.
    A plain dataclasses.field with metadata rather than a descriptor of our own: Config stays
    an ordinary dataclass (fields(), replace(), keyword construction, type hints for mypy).
    commands: the `virtbroker` commands that take it as an option (default: every one);
    metavar: what its command-line option's value looks like (default: from its type).
    """
    metadata = {"help": help, "check": check, "commands": commands, "metavar": metavar}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    state_dir: str = option(default_factory=default_state_dir, help=(
        "where the broker keeps its database and ipc sockets "
        "(default: $VIRTBROKER_STATE_DIR, /var/lib/virtbroker for root, else ~/.local/state/virtbroker)"))
    client_url: str = option("", help="client endpoint (default ipc://STATE_DIR/client.sock)")
    worker_url: str = option("", help="worker endpoint (default ipc://STATE_DIR/worker.sock)")
    events_url: str = option("", help="event endpoint (default ipc://STATE_DIR/events.sock)")
    # The client endpoint again, over a plain UNIX stream socket (common/stream.py): the
    # lowest-latency way in for a client on the broker's host.
    local_url: str = option("", check=_check_local_url,
                            help="client endpoint over a UNIX stream socket (default unix://STATE_DIR/local.sock)")
    # libvirt's remote protocol for virsh, libvirt-python and virt-install (`virtbroker
    # libvirt-gateway`, gateway/): read-write and owner-only, and a read-only twin for reads and
    # events, as libvirtd has libvirt-sock and libvirt-sock-ro. No tcp:// form.
    libvirt_url: str = option("", check=_check_local_url, commands=("libvirt-gateway", "up"),
                              help="libvirt-compatible socket (default unix://STATE_DIR/libvirt-sock)")
    libvirt_readonly_url: str = option("", check=_check_local_url, commands=("libvirt-gateway", "up"),
                                       help="its read-only twin (default: libvirt_url's path + '-ro')")
    uri: str = option("test:///default", help="libvirt URI of the lifecycle workers")
    workers: int = option(2, check=at_least(0), commands=("up",), help="lifecycle workers `up` starts")
    # With `up`'s 2 workers, 20 jobs at once on a host, as libvirtd's 20 workers.
    slots: int = option(10, check=at_least(1), help="jobs one lifecycle worker runs at once")
    # The destroy lane (docs/ARCHITECTURE.md): as libvirtd's 5 priority workers, extra slots only
    # destroy and reconcile may take, when every ordinary slot is busy.
    priority_slots: int = option(5, check=at_least(0),
                                 help="lifecycle worker: extra slots for destroy and reconcile only")
    lease_ttl_s: float = option(10.0, check=duration(), help="lease TTL in seconds")
    heartbeat_interval_s: float = option(0.0, check=duration(zero="lease_ttl_s / 4"),
                                         help="seconds between worker heartbeats (default lease TTL / 4)")
    # Lifecycle workers follow libvirt's domain events; the full list of the host's guests
    # is a backstop for an event lost while reconnecting, so it can be slow.
    resync_interval_s: float = option(120.0, check=duration(),
                                      help="seconds between lifecycle workers' full reports of their host's guests")
    # Hosts that fail (docs/RELIABILITY.md, "Hosts that fail"). A host is alive while any of
    # its lifecycle workers renews its host lease (each heartbeat, acknowledged by the broker).
    host_dead_s: float = option(30.0, check=duration(),
                                help="broker: seconds without a renewal before a host is unreachable")
    self_fence_s: float = option(20.0, check=duration(zero="never self-fence"),
                                 help="seconds without a renewal before a lifecycle worker destroys its host's "
                                      "guests (only while the host holds HA guests; less than host_dead_s)")
    partition_fraction: float = option(0.5, check=lambda f: None if 0 < f <= 1 else "must be in (0, 1]",
                                       help="broker: fence nobody when more than this share of hosts is lost at once")
    fence_quiet_s: float = option(60.0, check=duration(zero="fence at once"),
                                  help="broker: seconds after it starts or takes over in which it fences no host")
    fence_margin_s: float = option(10.0, check=duration(zero="none"),
                                   help="broker: seconds past host_dead_s after which a host with a watchdog "
                                        "counts as fenced by its own reset")
    fence_command: str = option("", metavar="PROGRAM",
                                help="broker: program run with a host id to power it off (exit 0: it is off)")
    fence_retry_s: float = option(10.0, check=duration(), help="broker: seconds between tries of fence_command")
    queue_timeout_s: float = option(60.0, check=duration(),
                                    help="broker: seconds a job may wait for a host that can run it before it fails")
    shared_storage_roots: list[str] = option(
        default_factory=list, metavar="DIR",
        help="lifecycle worker: a directory every host that lists it shares (HA guests restart where their disks are)",
    )
    watchdog_device: str = option("", metavar="PATH",
                                  help="lifecycle worker: a watchdog petted after each renewal of the host lease "
                                       "while self-fencing is armed (e.g. /dev/watchdog; off by default)")
    shutdown_timeout_s: float = option(60.0, check=duration(zero="destroy at once"),
                                       help="seconds of ACPI shutdown before destroy, when the job names none")
    security: list[str] = option(default_factory=list, check=each_one_of(*SECURITY_DRIVERS), metavar="DRIVER[,DRIVER]",
                                 help="security drivers, comma-separated: dac,apparmor")
    guest_user: str = option("", metavar="USER[:GROUP]", help="USER[:GROUP] QEMU runs as when dac is on")
    storage_roots: list[str] = option(
        default_factory=list, metavar="DIR", help="a directory guests' files may live in (repeatable)"
    )
    serialization: str = option("per-resource", check=one_of("per-resource", "global"),
                                help="security driver locking: per-resource or global")
    security_slots: int = option(8, check=at_least(1), help="label requests one security worker serves at once")
    # Emulators a guest may name in <emulator> when apparmor is on; empty: the ones libvirt's
    # capabilities list on the host.
    allowed_emulators: list[str] = option(default_factory=list, metavar="PATH",
                                          help="apparmor: an emulator guests may name (repeatable; default: libvirt's)")
    readonly_url: str = option("", help="an extra endpoint that serves lookups, lists and job status only")
    # CURVE: the broker's key directory (see common/curve.py) turns authentication on for
    # every endpoint; workers and clients name the broker's public key and their own secret.
    curve_dir: str = option("", help="broker: CURVE key directory (virtbroker keygen); turns on authentication")
    curve_server_key: str = option("", help="worker: the broker's public key file")
    curve_secret_key: str = option("", help="worker: this worker's secret key file")
    # Final jobs the broker keeps (in memory and in broker.sqlite3); older ones are forgotten.
    job_history: int = option(10000, check=at_least(1),
                              help="broker: final jobs to keep before the oldest are forgotten")
    # Events the broker's store keeps for replay (the `events` request); older ones are forgotten.
    event_history: int = option(100000, check=at_least(1), help="broker: events kept for replay")
    # Where the broker keeps its state: "sqlite" (STATE_DIR/broker.sqlite3, one broker), or an
    # etcd cluster, etcd://HOST:PORT[,HOST:PORT...]: then any number of brokers share it, one
    # leads (under a lease of leader_ttl_s, its fencing token on every write) and the others
    # stand by (docs/ARCHITECTURE.md, Failover).
    store: str = option("sqlite", check=_check_store, metavar="sqlite|etcd://HOST:PORT[,...]",
                        help="broker: the state store")
    etcd_prefix: str = option("/virtbroker/", help="broker: the key prefix of its state in etcd")
    leader_ttl_s: float = option(2.0, check=duration(), help="broker: the etcd lease of the leader, in seconds")
    store_timeout_s: float = option(2.0, check=duration(),
                                    help="broker: how long an etcd request may take before it counts as failed")
    metrics_port: int = option(0, check=at_least(0, 65535),
                               help="serve the broker's Prometheus metrics on this port (0: off)")
    metrics_addr: str = option("127.0.0.1", help="address the metrics port listens on")
    log_level: str = option("INFO", check=one_of(*LOG_LEVELS, upper=True), help="DEBUG, INFO, WARNING, ERROR")
    # The broker's loop thread (and the threads it starts: the store writer) in the real-time
    # class SCHED_RR at this priority, as corosync runs: on a host whose CPUs are busy with
    # other work the broker is scheduled first. The risk: a real-time thread that spins (a
    # bug, a flood of requests) takes its CPU from everything else on the host, sshd and
    # libvirtd too, up to the kernel's real-time limit (kernel.sched_rt_runtime_us, 95% by
    # default); with 2 CPUs the broker's two busy threads can hold most of the host.
    # Needs CAP_SYS_NICE (root, or an RLIMIT_RTPRIO of at least this).
    realtime_priority: int = option(0, check=at_least(0, 99), help=(
        "broker: run its loop under SCHED_RR at this priority, 1-99 (0: off, the default). Faster on a "
        "busy host, but a runaway broker can then starve every other process of the host"))
    # tcp:// endpoints carry every domain's definition and every job: without CURVE they are
    # refused unless the operator says so here.
    allow_insecure_tcp: bool = option(
        False, help="accept tcp:// endpoints without CURVE (anyone who reaches them is a peer)"
    )
    # Limits on what one broker holds; a request past one is refused with code "limit".
    max_domains: int = option(200000, check=at_least(1), help="broker: domains it holds at most")
    max_queued_jobs: int = option(100000, check=at_least(1), help="broker: queued jobs at most, in all")
    max_queued_jobs_per_domain: int = option(1000, check=at_least(1), help="broker: queued jobs at most per domain")
    # Deadlines per operation (seconds): a worker stops renewing a job's lease at its deadline,
    # so a libvirt call that hangs ends the job `lost` (reason deadline) instead of holding
    # the domain's queue for ever. A shutdown's deadline adds its ACPI timeout. A job may
    # name a shorter or longer one (deadline_s on submit). Operations not named keep theirs.
    deadline_s: dict[str, float] = option(
        default_factory=lambda: dict(DEFAULT_DEADLINES_S), check=_check_deadlines, metavar="OP:SECONDS",
        help="broker: OP:SECONDS, how long a job of OP may run before it ends lost (repeatable)")
    # How `virtbroker up` restarts its children, as supervisord's startsecs and startretries: a
    # child that exits before it has run startsecs_s counts as a failed start; after the first
    # start and startretries retries all failed so, `up` stops everything and exits non-zero.
    startsecs_s: float = option(1.0, check=duration(zero="a child is running as soon as it starts"), commands=("up",),
                                help="seconds a child of up must run for its start to count as a success")
    startretries: int = option(3, check=at_least(0), commands=("up",),
                               help="failed starts in a row of one child that up retries before it gives up")

    def __post_init__(self):
        self.finish()

    def finish(self) -> Config:
        """Fill derived defaults and check values; call again after changing fields."""
        self.state_dir = os.path.abspath(os.path.expanduser(self.state_dir))
        if not self.client_url:
            self.client_url = f"ipc://{self.state_dir}/client.sock"
        if not self.worker_url:
            self.worker_url = f"ipc://{self.state_dir}/worker.sock"
        if not self.events_url:
            self.events_url = f"ipc://{self.state_dir}/events.sock"
        if not self.local_url:
            self.local_url = f"unix://{self.state_dir}/local.sock"
        if not self.libvirt_url:
            self.libvirt_url = f"unix://{self.state_dir}/libvirt-sock"
        if not self.libvirt_readonly_url:
            self.libvirt_readonly_url = self.libvirt_url + "-ro"
        for f in fields(self):
            value = _of_type(f.name, _TYPES[f.name], getattr(self, f.name))
            setattr(self, f.name, value)
            check = f.metadata.get("check")
            problem = check(value) if check else None
            if problem:
                raise ConfigError(f"{f.name}: {problem}")
        if self.heartbeat_interval_s == 0:
            self.heartbeat_interval_s = self.lease_ttl_s / 4
        if self.heartbeat_interval_s >= self.lease_ttl_s:
            raise ConfigError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s:g}) must be shorter than "
                f"lease_ttl_s ({self.lease_ttl_s:g})"
            )
        if self.security and self.uri.startswith("test:///"):
            raise ConfigError(
                f"security drivers need a hypervisor the host's workers share (qemu:///system); {self.uri} "
                "lives inside each worker process"
            )
        if "dac" in self.security and not self.guest_user:
            raise ConfigError("the dac security driver needs guest_user (USER[:GROUP])")
        if "apparmor" in self.security and not self.storage_roots:
            raise ConfigError("the apparmor security driver needs at least one storage root (--storage-root DIR)")
        if self.self_fence_s and self.self_fence_s >= self.host_dead_s:
            raise ConfigError(
                f"self_fence_s ({self.self_fence_s:g}) must be shorter than host_dead_s ({self.host_dead_s:g}): "
                "a host must destroy its guests before the broker may count them dead"
            )
        self.shared_storage_roots = [os.path.abspath(r) for r in self.shared_storage_roots]
        self.deadline_s = {**DEFAULT_DEADLINES_S, **self.deadline_s}
        return self

    @classmethod
    def load(cls, path: str | None = None, **overrides) -> Config:
        """Defaults, then the [virtbroker] section of PATH, then non-None overrides.

        Values may be strings (or, for lists and deadlines, lists of strings, one per
        repeated option); they are parsed by the field's type. A deadline_s override is
        merged into the file's, operation by operation; any other override replaces.
        """
        values: dict = {}
        if path:
            parser = configparser.ConfigParser()
            try:
                if not parser.read(path):
                    raise ConfigError(f"cannot read config file {path}")
                section = dict(parser.items("virtbroker")) if parser.has_section("virtbroker") else {}
            except configparser.Error as e:
                raise ConfigError(f"config file {path}: {' '.join(str(e).split())}") from None
            values.update(_parsed(section))
        given = _parsed({k: v for k, v in overrides.items() if v is not None})
        for key, value in given.items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                value = {**values[key], **value}
            values[key] = value
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from e


_TYPES: dict[str, Any] = typing.get_type_hints(Config)


def config_fields(command: str | None = None) -> list[Field]:
    """Config's fields, or those a `virtbroker COMMAND` takes as options."""
    return [f for f in fields(Config) if command is None or not f.metadata.get("commands")
            or command in f.metadata["commands"]]


def field_type(f: Field) -> Any:
    """The field's type as a class or generic alias (the annotations are strings here)."""
    return _TYPES[f.name]


def option_flags(f: Field) -> list[str]:
    """--lease-ttl and --lease-ttl-s for lease_ttl_s; --storage-root and --storage-roots for
    storage_roots: the field's own name, and before it the short spelling options had
    before they were derived from the fields, which still works."""
    own = "--" + f.name.replace("_", "-")
    short = own
    if f.name.endswith("_s"):
        short = own[: -len("-s")]
    elif typing.get_origin(_TYPES[f.name]) is list and f.name.endswith("s"):
        short = own[:-1]
    return [short, own] if short != own else [own]


def parse_value(key: str, raw: Any) -> Any:
    """The text of an ini value or of a command-line option as field KEY's type. A list of
    texts is a repeated option: a list field gets all their items, a deadline_s map all
    their entries (the last one of an operation wins). Anything else is left to finish."""
    if key not in _TYPES:
        raise ConfigError(f"unknown config option {key}")
    kind = _TYPES[key]
    repeated = isinstance(raw, list) and all(isinstance(r, str) for r in raw)
    if repeated and kind == list[str]:
        return [v for text in raw for v in _parse_text(key, kind, text)]
    if repeated and kind == dict[str, float]:
        return {op: s for text in raw for op, s in _parse_text(key, kind, text).items()}
    return _parse_text(key, kind, raw) if isinstance(raw, str) else raw


def _parse_text(key: str, kind: Any, text: str) -> Any:
    if kind is str:
        return text
    value = text.strip()
    try:
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)  # "nan" and "inf" parse; the field's check refuses them
        if kind is bool:
            if value.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"{key}: {text!r} is not true or false")
            return value.lower() in _TRUE
        if kind == list[str]:
            return [v.strip() for v in value.replace("\n", ",").split(",") if v.strip()]
        if kind == dict[str, float]:
            return _dict_of_floats(value)
    except ValueError:
        what = "an integer" if kind is int else "a number" if kind is float else "OP:SECONDS[,OP:SECONDS...]"
        raise ConfigError(f"{key}: {text!r} is not {what}") from None
    raise ConfigError(f"{key}: no parser for its type {kind}")  # a field of a new type: add one above


_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def _dict_of_floats(value: str) -> dict[str, float]:
    out = {}
    for item in value.replace("\n", ",").split(","):
        if not item.strip():
            continue
        name, sep, number = item.partition(":")
        if not sep:
            raise ValueError(item)
        out[name.strip()] = float(number)
    return out


def _parsed(raw: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(_TYPES))
    if unknown:
        raise ConfigError(f"unknown config option(s): {', '.join(unknown)}")
    return {key: parse_value(key, value) for key, value in raw.items()}


def _of_type(key: str, kind: Any, value: Any) -> Any:
    """VALUE as field KEY's type, or a ConfigError: Config(...) from Python gets no parsing,
    but an int where a float goes is fine."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if kind == list[str]:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{key}: {value!r} is not a list of strings")
    if kind == dict[str, float]:
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()
        ):
            return {k: float(v) for k, v in value.items()}
        raise ConfigError(f"{key}: {value!r} is not a map of names to seconds")
    if not isinstance(value, kind):
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))
        raise ConfigError(f"{key}: {value!r} is not {what}")
    return value

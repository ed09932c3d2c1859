"""Configuration shared by every process: defaults, the ini file, and command-line overrides."""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass, field, fields

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


@dataclass
class Config:
    state_dir: str = field(default_factory=default_state_dir)
    client_url: str = ""  # default: ipc://STATE_DIR/client.sock
    worker_url: str = ""  # default: ipc://STATE_DIR/worker.sock
    events_url: str = ""  # default: ipc://STATE_DIR/events.sock
    # The client endpoint again, over a plain UNIX stream socket (common/stream.py): the
    # lowest-latency way in for a client on the broker's host.
    local_url: str = ""  # default: unix://STATE_DIR/local.sock
    uri: str = "test:///default"
    workers: int = 2  # lifecycle workers started by `virtbroker up`
    slots: int = 4  # jobs one lifecycle worker runs at once
    lease_ttl_s: float = 10.0
    heartbeat_interval_s: float = 0.0  # default: lease_ttl_s / 4
    resync_interval_s: float = 15.0  # lifecycle workers report their host's guests this often
    shutdown_timeout_s: float = 60.0  # ACPI shutdown before destroy, when the job names none
    security: list[str] = field(default_factory=list)  # drivers: dac, apparmor
    guest_user: str = ""  # USER[:GROUP] QEMU runs as when dac is on
    storage_roots: list[str] = field(default_factory=list)
    serialization: str = "per-resource"  # or global
    security_slots: int = 8
    # Emulators a guest may name in <emulator> when apparmor is on; empty: the ones libvirt's
    # capabilities list on the host.
    allowed_emulators: list[str] = field(default_factory=list)
    readonly_url: str = ""  # optional endpoint that serves lookups, lists and job status only
    # CURVE: the broker's key directory (see common/curve.py) turns authentication on for
    # every endpoint; workers and clients name the broker's public key and their own secret.
    curve_dir: str = ""
    curve_server_key: str = ""
    curve_secret_key: str = ""
    # Final jobs the broker keeps (in memory and in broker.sqlite3); older ones are forgotten.
    job_history: int = 10000
    metrics_port: int = 0  # Prometheus metrics of the broker over HTTP; 0 = off
    metrics_addr: str = "127.0.0.1"
    log_level: str = "INFO"
    # tcp:// endpoints carry every domain's definition and every job: without CURVE they are
    # refused unless the operator says so here.
    allow_insecure_tcp: bool = False
    # Limits on what one broker holds; a request past one is refused with code "limit".
    max_domains: int = 200000
    max_queued_jobs: int = 100000
    max_queued_jobs_per_domain: int = 1000
    # Deadlines per operation (seconds): a worker stops renewing a job's lease at its deadline,
    # so a libvirt call that hangs ends the job `lost` (reason deadline) instead of holding
    # the domain's queue for ever. A shutdown's deadline adds its ACPI timeout. A job may
    # name a shorter or longer one (deadline_s on submit).
    deadline_s: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DEADLINES_S))

    def __post_init__(self):
        self.finish()

    def finish(self) -> "Config":
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
        if not is_stream_url(self.local_url) or not stream_path(self.local_url).startswith("/"):
            raise ConfigError(f"local_url must be unix:///ABSOLUTE/PATH, not '{self.local_url}'")
        if len(stream_path(self.local_url).encode()) > MAX_SOCKET_PATH_BYTES:
            raise ConfigError(
                f"local_url's path is over {MAX_SOCKET_PATH_BYTES} bytes, the limit of a UNIX socket: {self.local_url}"
            )
        if self.heartbeat_interval_s <= 0:
            self.heartbeat_interval_s = self.lease_ttl_s / 4
        if self.lease_ttl_s <= 0:
            raise ConfigError("lease_ttl_s must be positive")
        if self.workers < 0 or self.slots < 1:
            raise ConfigError("workers must be >= 0 and slots >= 1")
        if self.job_history < 1:
            raise ConfigError("job_history must be at least 1")
        for driver in self.security:
            if driver not in ("dac", "apparmor"):
                raise ConfigError(f"unknown security driver '{driver}' (dac, apparmor)")
        if self.serialization not in ("per-resource", "global"):
            raise ConfigError(f"serialization must be per-resource or global, not '{self.serialization}'")
        if self.security and self.uri.startswith("test:///"):
            raise ConfigError(
                f"security drivers need a hypervisor the host's workers share (qemu:///system); {self.uri} "
                "lives inside each worker process"
            )
        if "dac" in self.security and not self.guest_user:
            raise ConfigError("the dac security driver needs guest_user (USER[:GROUP])")
        if "apparmor" in self.security and not self.storage_roots:
            raise ConfigError("the apparmor security driver needs at least one storage root (--storage-root DIR)")
        for key in ("max_domains", "max_queued_jobs", "max_queued_jobs_per_domain"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1")
        deadlines = dict(DEFAULT_DEADLINES_S)
        for op, seconds in self.deadline_s.items():
            if op not in DEFAULT_DEADLINES_S:
                raise ConfigError(f"deadline_s names unknown operation '{op}' ({', '.join(DEFAULT_DEADLINES_S)})")
            if not 0 < seconds <= MAX_DEADLINE_S:  # NaN fails too
                raise ConfigError(f"deadline_s for {op} must be between 0 and {MAX_DEADLINE_S:g} seconds")
            deadlines[op] = float(seconds)
        self.deadline_s = deadlines
        return self

    @classmethod
    def load(cls, path: str | None = None, **overrides) -> "Config":
        """Defaults, then the [virtbroker] section of PATH, then non-None overrides."""
        values: dict = {}
        if path:
            parser = configparser.ConfigParser()
            if not parser.read(path):
                raise ConfigError(f"cannot read config file {path}")
            if parser.has_section("virtbroker"):
                values.update(_typed(dict(parser.items("virtbroker"))))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config option(s): {', '.join(unknown)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from e


_LISTS = ("security", "storage_roots", "allowed_emulators")
_INTS = (
    "workers", "slots", "security_slots", "metrics_port", "job_history", "max_domains", "max_queued_jobs",
    "max_queued_jobs_per_domain",
)
_FLOATS = ("lease_ttl_s", "resync_interval_s", "heartbeat_interval_s", "shutdown_timeout_s")
_BOOLS = ("allow_insecure_tcp",)
_DICTS_OF_FLOATS = ("deadline_s",)  # "op:seconds, op:seconds"


def parse_deadlines(key: str, value: str) -> dict[str, float]:
    """"start:300, destroy:60" -> {"start": 300.0, "destroy": 60.0}; checked by Config.finish."""
    try:
        return _dict_of_floats(key, value)
    except ValueError:
        raise ConfigError(f"{key}: {value!r} is not OP:SECONDS[,OP:SECONDS...]") from None


def _dict_of_floats(key: str, value: str) -> dict[str, float]:
    out = {}
    for item in value.replace("\n", ",").split(","):
        if not item.strip():
            continue
        name, sep, number = item.partition(":")
        if not sep:
            raise ConfigError(f"config option {key}: '{item.strip()}' is not OP:SECONDS")
        out[name.strip()] = float(number)
    return out


def _typed(raw: dict[str, str]) -> dict:
    out: dict = {}
    for key, value in raw.items():
        try:
            if key in _LISTS:
                out[key] = [v.strip() for v in value.replace("\n", ",").split(",") if v.strip()]
            elif key in _INTS:
                out[key] = int(value)
            elif key in _FLOATS:
                out[key] = float(value)
            elif key in _BOOLS:
                if value.strip().lower() not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ConfigError(f"config option {key} = {value!r} is not true or false")
                out[key] = value.strip().lower() in ("true", "yes", "1", "on")
            elif key in _DICTS_OF_FLOATS:
                out[key] = _dict_of_floats(key, value)
            else:
                out[key] = value
        except ValueError:
            raise ConfigError(f"config option {key} = {value!r} is not a number") from None
    return out

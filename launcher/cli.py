"""`virtbroker`: run the broker, workers, or all of them together (`up`), and the demo."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import MISSING
from typing import Any

from virtbroker.common.config import Config, config_fields, field_type, option_flags
from virtbroker.common.errors import VirtbrokerError
from virtbroker.common.logsetup import setup_logging

log = logging.getLogger("virtbroker")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _common_options(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    """-c, and one option per Config field that COMMAND takes (common/config.py declares each
    field's type, help and check once; the option, the ini key and the check follow from it)."""
    parser.add_argument("-c", "--config", help="ini file with a [virtbroker] section (configs/virtbroker.ini)")
    for f in config_fields(command):
        kind = field_type(f)
        help_text = f.metadata.get("help", "")
        shown = f.default if f.default is not MISSING else None
        if shown not in (None, "", 0, False) and "default" not in help_text:
            help_text += f" (default {shown:g})" if isinstance(shown, float) else f" (default {shown})"
        metavar = f.metadata.get("metavar") or _METAVARS.get(kind, "S" if f.name.endswith("_s") else None)
        flags = option_flags(f)
        if kind is bool:
            # --allow-insecure-tcp / --no-allow-insecure-tcp; None: not given, the ini decides.
            parser.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif kind in (list[str], dict[str, float]):
            # Repeatable, and each value may hold several, comma-separated (--security dac,apparmor).
            parser.add_argument(*flags, dest=f.name, action="append", metavar=metavar, help=help_text)
        else:
            # Kept as text: Config.load parses it by the field's type, so a bad value is one
            # ConfigError line naming the key, from the command line as from the ini.
            parser.add_argument(*flags, dest=f.name, metavar=metavar, help=help_text)


_METAVARS = {int: "N", str: None, list[str]: "ITEM[,ITEM]", dict[str, float]: "KEY:VALUE"}


def _config(args: argparse.Namespace) -> Config:
    overrides = {f.name: getattr(args, f.name, None) for f in config_fields()}
    return Config.load(args.config, **overrides)


def cmd_broker(args) -> int:
    from virtbroker.broker.server import run_broker

    config = _config(args)
    setup_logging(config.log_level)
    return run_broker(config)


def cmd_worker(args) -> int:
    from virtbroker.workers.lifecycle import run_worker

    config = _config(args)
    setup_logging(config.log_level)
    return run_worker(config, args.worker_id)


def cmd_security_worker(args) -> int:
    from virtbroker.workers.security.service import run_security_worker

    config = _config(args)
    setup_logging(config.log_level)
    return run_security_worker(config, args.driver, args.worker_id)


def cmd_libvirt_gateway(args) -> int:
    from virtbroker.gateway.server import run_gateway

    config = _config(args)
    setup_logging(config.log_level)
    return run_gateway(config)


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send SIGTERM when `up` dies, even by kill -9, so no child is orphaned."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: children outlive a killed `up`, as before
    if os.getppid() != parent_pid:
        os._exit(EXIT_ERROR)  # `up` died between the fork and the prctl: nobody would tell us


def _child(target, config: Config, parent_pid: int, *extra):
    # Children of `up` log through the parent's handler (multiprocessing-logging) and
    # leave Ctrl-C to the parent, which stops them in order.
    _die_with_parent(parent_pid)
    signal.set_wakeup_fd(-1)  # the parent's wake-up pipe is the parent's
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = target(config, *extra)
    except VirtbrokerError as e:
        # One line, as `virtbroker broker` would print, instead of a traceback per restart.
        log.error("error: %s", e)
        code = EXIT_USAGE if e.code == "config" else EXIT_ERROR
    sys.exit(code)


class Restarts:
    """When `up` starts each child again, as supervisord does (supervisor/process.py): pure,
    the clock passed in.

    A child that exits after running startsecs_s or more was RUNNING: it is started again at
    once. One that exits sooner failed to start (STARTING -> BACKOFF) and waits 1 s, then 2 s,
    ... before the next try; after the first start and startretries retries all failed so, it
    is FATAL and `up` gives up. supervisor itself is not used as a library here: its process
    management lives inside supervisord's event loop and config objects (and it would make an
    extra a dependency of `up`); what `up` needs of it is this table and a wait.
    """

    def __init__(self, startsecs_s: float, startretries: int):
        self.startsecs_s = startsecs_s
        self.startretries = startretries
        self.started_at: dict[str, float] = {}
        self.failed_starts: dict[str, int] = {}
        self.restart_at: dict[str, float] = {}

    def started(self, name: str, now: float) -> None:
        # BACKOFF (or new) -> STARTING
        self.restart_at.pop(name, None)
        self.started_at[name] = now

    def exited(self, name: str, now: float) -> float | None:
        """The child's restart time, or None when it is FATAL."""
        if now - self.started_at[name] >= self.startsecs_s:
            # RUNNING -> EXITED: it had started fine; start it again at once.
            self.failed_starts[name] = 0
            self.restart_at[name] = now
            return now
        failures = self.failed_starts.get(name, 0) + 1
        self.failed_starts[name] = failures
        if failures > self.startretries:
            return None  # BACKOFF -> FATAL
        # STARTING -> BACKOFF
        self.restart_at[name] = now + failures
        return self.restart_at[name]

    def due(self, now: float) -> list[str]:
        return sorted(name for name, at in self.restart_at.items() if at <= now)

    def next_due(self) -> float | None:
        return min(self.restart_at.values(), default=None)


def cmd_up(args) -> int:
    """The broker, N lifecycle workers and the security workers, in the foreground, one merged
    log; a child that exits is started again (class Restarts). With --ha: a local 3-member etcd
    cluster (STATE_DIR/etcd), two brokers on it (STATE_DIR/broker-a, -b; one leads, one stands
    by) and workers that follow the leader."""
    from multiprocessing.connection import wait as wait_for_any

    import multiprocessing_logging

    from virtbroker.broker.server import run_broker
    from virtbroker.workers.lifecycle import run_worker

    config = _config(args)
    setup_logging(config.log_level)
    # Children log through a queue the parent drains. `up`'s own lines about its children go
    # straight to stderr instead: a child killed while it holds the queue's write lock would
    # otherwise silence the very lines that say it died and was started again.
    up_log = logging.getLogger("virtbroker.up")
    up_log.handlers[:] = list(logging.getLogger().handlers)
    up_log.propagate = False
    multiprocessing_logging.install_mp_handler()
    ctx = multiprocessing.get_context("fork")

    # Each child: (name, target, its config, extra arguments); target None is an etcd member.
    specs: list[tuple[str, object, Config, tuple]] = [("broker", run_broker, config, ())]
    worker_config = config
    etcd_layout = None
    if getattr(args, "ha", False):
        from virtbroker.launcher import etcd as local_etcd

        etcd_layout, broker_configs, worker_config = _ha_plan(args, config)
        specs = [(f"etcd-{m}", None, config, (i,)) for i, m in enumerate(etcd_layout.names)]
        specs += [(name, run_broker, broker_config, ()) for name, broker_config in broker_configs]
    if config.security:
        from virtbroker.workers.security.service import run_security_worker

        specs += [(f"security-{d}", run_security_worker, worker_config, (d,)) for d in config.security]
    specs += [(f"worker-{i + 1}", run_worker, worker_config, ()) for i in range(config.workers)]
    if etcd_layout is None:
        # The libvirt-compatible endpoint on STATE_DIR/libvirt-sock: restarted like the others,
        # and stopped before the broker. (Under --ha it is not started: it talks to one broker.)
        from virtbroker.gateway.server import run_gateway

        specs.append(("libvirt-gateway", run_gateway, config, ()))
    by_name = {name: (target, child_config, extra) for name, target, child_config, extra in specs}

    children: dict[str, Any] = {}  # the live ones: forked children (BaseProcess) and etcd members
    restarts = Restarts(config.startsecs_s, config.startretries)

    def spawn(name: str) -> Any:
        target, child_config, extra = by_name[name]
        proc: Any
        if target is None:
            # An etcd member: a process of its own (not a fork), with the same interface; it
            # gets SIGTERM if `up` dies, as the forked children do.
            (member,) = extra  # its index in the layout
            proc = local_etcd.MemberProcess(etcd_layout, member, die_with_parent="TERM")
        else:
            proc = ctx.Process(target=_child, args=(target, child_config, os.getpid(), *extra), name=name, daemon=False)
            proc.start()
        children[name] = proc
        restarts.started(name, time.monotonic())
        return proc

    # A signal wakes the wait below through this pipe (signal.set_wakeup_fd), so a SIGTERM
    # is acted on at once and no loop needs to poll.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if stopping:
            for proc in children.values():
                if proc.is_alive():
                    proc.kill()
            os._exit(EXIT_ERROR)
        stopping = True

    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fatal = ""
    for name, target, _, _ in specs:
        if stopping:
            break
        spawn(name)
        if target is None and name == f"etcd-{etcd_layout.names[-1]}":
            # The brokers start on a cluster with a quorum, so their first campaign succeeds.
            try:
                local_etcd.wait_healthy(etcd_layout, list(children.values()), ETCD_START_S, lambda: stopping)
            except VirtbrokerError as e:
                fatal = str(e)
                up_log.error("%s", fatal)
                break
        if target is run_broker and etcd_layout is not None and name == broker_configs[-1][0]:
            # Workers start once a broker leads, so none is sent back and forth between standbys.
            try:
                local_etcd.wait_leader(broker_configs, ETCD_START_S, lambda: stopping)
            except VirtbrokerError as e:
                fatal = str(e)
                up_log.error("%s", fatal)
                break
    if etcd_layout is not None:
        log.info("virtbroker up --ha: clients connect at %s or, on this host, %s (etcd at %s, data in %s)",
                 local_etcd.client_urls(broker_configs), local_etcd.client_urls(broker_configs, "local_url"),
                 etcd_layout.store_url, etcd_layout.base_dir)
    else:
        log.info("virtbroker up: clients connect at %s or, on this host, %s", config.client_url, config.local_url)
    while not stopping and not fatal:
        due_at = restarts.next_due()
        timeout_s = None if due_at is None else max(0.0, due_at - time.monotonic())
        wait_for_any([proc.sentinel for proc in children.values()] + [wake_r], timeout_s)
        try:
            os.read(wake_r, 512)
        except BlockingIOError:
            pass
        if stopping:
            break
        now = time.monotonic()
        for name, proc in list(children.items()):
            if proc.exitcode is None:
                continue
            del children[name]
            proc.join(0)  # reaped; an etcd member's pidfd closed
            ran_s = now - restarts.started_at[name]
            restart_at = restarts.exited(name, now)
            how = _exit_status(proc.exitcode)
            if restart_at is None:
                fatal = (f"{name} failed to start {config.startretries + 1} times in a row (each time it ended within "
                         f"{config.startsecs_s:g} s; last it {how}); giving up")
                up_log.error("%s", fatal)
                break
            if etcd_layout is not None and name in by_name and by_name[name][0] is run_broker:
                # A broker started again while its dead self's leader lease still stands reads
                # that lease as another leader at its own URLs, and sends workers back to the
                # URL they just left (where the broker's ROUTER may drop them): wait until the
                # lease has lapsed (etcd notices up to 0.5 s late) and the standby has taken over.
                restart_at = max(restart_at, now + 2 * config.leader_ttl_s + 1.0)
                restarts.restart_at[name] = restart_at
            when = "now" if restart_at <= now else f"in {restart_at - now:.0f} s"
            up_log.warning("%s (pid %d) %s after %.1f s; starting it again %s", name, proc.pid, how, ran_s, when)
        if fatal:
            break
        for name in restarts.due(time.monotonic()):
            proc = spawn(name)
            up_log.info("%s started again (pid %d)", name, proc.pid)
    # Workers first, so they finish their jobs while the broker still listens.
    up_log.info("stopping")
    workers = [n for n in children if n.startswith("worker")]
    security = [n for n in children if n.startswith("security")]
    brokers = [n for n in children if n == "broker" or n.startswith("broker-")]
    members = [n for n in children if n.startswith("etcd-")]
    others = [n for n in children if n not in workers + security + brokers + members]  # the libvirt gateway, say
    # etcd last: a broker that stops resigns its lead in etcd, and stops cleanly only while etcd answers.
    groups = [workers, security, others, brokers, members]
    for group in groups:
        for name in group:
            if children[name].is_alive():
                children[name].terminate()  # SIGTERM
        deadline = time.monotonic() + STOP_WAIT_S
        for name in group:
            proc = children[name]
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                up_log.warning("%s did not stop in %.0f s; killing it", name, STOP_WAIT_S)
                proc.kill()
                proc.join()
    signal.set_wakeup_fd(-1)
    return EXIT_ERROR if fatal else EXIT_OK


# A worker finishes its running jobs for up to 30 s (workers/lifecycle.py STOP_GRACE_S), then
# says goodbye: the same 40 s as supervisord's stopwaitsecs and systemd's TimeoutStopSec.
STOP_WAIT_S = 40.0
ETCD_START_S = 30.0  # `up --ha`: how long the local etcd members may take to be healthy


def _ha_plan(args, config: Config):
    """`up --ha`: the local etcd cluster's layout (kept in STATE_DIR/etcd), the brokers' configs
    and the workers' (launcher/etcd.py)."""
    from virtbroker.common.errors import ConfigError
    from virtbroker.launcher import etcd as local_etcd

    given = [key for key in local_etcd.HA_DERIVED_URLS if getattr(args, key, None)]
    if given:
        raise ConfigError(f"--ha gives each broker its endpoints in its own state dir; drop {', '.join(given)}")
    if getattr(args, "store", None):
        raise ConfigError("--ha runs its own etcd cluster (STATE_DIR/etcd) as the store; drop --store")
    local_etcd.check_installed()
    layout = local_etcd.LocalCluster.load_or_create(os.path.join(config.state_dir, "etcd"), 3, args.etcd_port)
    broker_configs, worker_config = local_etcd.ha_configs(config, layout)
    for _, broker_config in broker_configs:
        os.makedirs(broker_config.state_dir, exist_ok=True)
    return layout, broker_configs, worker_config


def _exit_status(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def cmd_demo(args) -> int:
    from virtbroker.launcher.demo import run_demo

    if args.ha:
        from virtbroker.launcher.demo import run_ha_demo

        return run_ha_demo(guests=args.guests, workers=args.workers, uri=args.uri)
    return run_demo(guests=args.guests, workers=args.workers, uri=args.uri)


def cmd_keygen(args) -> int:
    from virtbroker.common.curve import keygen

    role = next((r for r in ("client", "worker", "readonly") if getattr(args, r)), None)
    name = getattr(args, role) if role else None
    for path in keygen(args.curve_dir, role, name, args.role, args.host):
        print(path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtbroker", description="VM control plane for busy libvirt hosts")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the broker and workers in the foreground")
    _common_options(up, "up")
    up.add_argument("--ha", action="store_true",
                    help="failover: a local 3-member etcd cluster (STATE_DIR/etcd), two brokers on it "
                         "(STATE_DIR/broker-a, -b) and workers following the leader")
    up.add_argument("--etcd-port", type=int, default=0, metavar="PORT",
                    help="with --ha: etcd client ports PORT..PORT+2, peer ports PORT+3..PORT+5 "
                         "(default: free ports, chosen once and kept in STATE_DIR/etcd/cluster.json)")
    up.set_defaults(func=cmd_up)

    broker = sub.add_parser("broker", help="run the broker alone (for supervisord)")
    _common_options(broker, "broker")
    broker.set_defaults(func=cmd_broker)

    worker = sub.add_parser("worker", help="run one lifecycle worker (for supervisord)")
    _common_options(worker, "worker")
    worker.add_argument("--worker-id", help="stable id for this worker (default: random)")
    worker.set_defaults(func=cmd_worker)

    sec = sub.add_parser("security-worker", help="run one security worker (for supervisord)")
    _common_options(sec, "security-worker")
    sec.add_argument("--driver", required=True, choices=("dac", "apparmor"))
    sec.add_argument("--worker-id", help="stable id for this worker (default: random)")
    sec.set_defaults(func=cmd_security_worker)

    gateway = sub.add_parser(
        "libvirt-gateway", help="serve libvirt's remote protocol (virsh, libvirt-python) on UNIX sockets"
    )
    _common_options(gateway, "libvirt-gateway")
    gateway.set_defaults(func=cmd_libvirt_gateway)

    keygen = sub.add_parser("keygen", help="make CURVE keys: the broker's, or a client's or worker's")
    keygen.add_argument("curve_dir", help="the broker's key directory (made if absent, with the server key)")
    who = keygen.add_mutually_exclusive_group()
    who.add_argument("--client", metavar="NAME", help="a key allowed on the client endpoint")
    who.add_argument("--worker", metavar="NAME", help="a key allowed on the worker endpoint")
    who.add_argument("--readonly", metavar="NAME", help="a key allowed on the read-only and event endpoints")
    keygen.add_argument("--role", choices=("lifecycle", "security"),
                        help="with --worker: the worker's role, recorded in its key (the broker believes nothing else)")
    keygen.add_argument("--host", help="with --worker: the host id the worker serves, recorded in its key")
    keygen.set_defaults(func=cmd_keygen)

    demo = sub.add_parser("demo", help="define, start, list and destroy guests on the embedded default")
    demo.add_argument("--guests", type=int, default=20)
    demo.add_argument("--workers", type=int, default=4)
    demo.add_argument("--uri", default="test:///default")
    demo.add_argument("--ha", action="store_true",
                      help="`up --ha` instead: kill -9 the leading broker and time the standby's takeover")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VirtbrokerError as e:
        print(f"virtbroker: error: {e}", file=sys.stderr)
        return EXIT_USAGE if e.code == "config" else EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

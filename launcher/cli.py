"""`virtbroker`: run the broker, workers, or all of them together (`up`), and the demo."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import time

from virtbroker.common.config import Config
from virtbroker.common.errors import VirtbrokerError
from virtbroker.common.logsetup import setup_logging

log = logging.getLogger("virtbroker")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="ini file with a [virtbroker] section (configs/virtbroker.ini)")
    parser.add_argument("--state-dir", help="where the broker keeps its database and ipc sockets")
    parser.add_argument("--client-url", help="client endpoint (default ipc://STATE_DIR/client.sock)")
    parser.add_argument("--worker-url", help="worker endpoint (default ipc://STATE_DIR/worker.sock)")
    parser.add_argument("--events-url", help="event endpoint (default ipc://STATE_DIR/events.sock)")
    parser.add_argument("--local-url", help="client endpoint over a UNIX stream socket (default unix://STATE_DIR/local.sock)")
    parser.add_argument("--uri", help="libvirt URI of the lifecycle workers (default test:///default)")
    parser.add_argument("--slots", type=int, help="jobs one lifecycle worker runs at once (default 4)")
    parser.add_argument("--lease-ttl", type=float, dest="lease_ttl_s", help="lease TTL in seconds (default 10)")
    parser.add_argument("--security", help="security drivers, comma-separated: dac,apparmor")
    parser.add_argument("--guest-user", help="USER[:GROUP] QEMU runs as when dac is on")
    parser.add_argument("--storage-root", action="append", dest="storage_roots", help="a directory guests' files may live in (repeatable)")
    parser.add_argument("--serialization", choices=("per-resource", "global"), help="security driver locking")
    parser.add_argument("--resync-interval", type=float, dest="resync_interval_s",
                        help="seconds between lifecycle workers' reports of their host's guests (default 15)")
    parser.add_argument("--readonly-url", help="an extra endpoint that serves lookups, lists and job status only")
    parser.add_argument("--curve-dir", help="broker: CURVE key directory (virtbroker keygen); turns on authentication")
    parser.add_argument("--curve-server-key", help="worker: the broker's public key file")
    parser.add_argument("--curve-secret-key", help="worker: this worker's secret key file")
    parser.add_argument("--metrics-port", type=int, help="serve the broker's Prometheus metrics on this port")
    parser.add_argument("--job-history", type=int, help="broker: final jobs to keep before the oldest are forgotten (default 10000)")
    parser.add_argument("--allow-insecure-tcp", action="store_true", default=None,
                        help="accept tcp:// endpoints without CURVE (anyone who reaches them is a peer)")
    parser.add_argument("--max-domains", type=int, help="broker: domains it holds at most (default 200000)")
    parser.add_argument("--max-queued-jobs", type=int, help="broker: queued jobs at most, in all (default 100000)")
    parser.add_argument("--max-queued-jobs-per-domain", type=int,
                        help="broker: queued jobs at most per domain (default 1000)")
    parser.add_argument("--deadline", action="append", metavar="OP:SECONDS",
                        help="broker: how long a job of OP may run before it ends lost (repeatable)")
    parser.add_argument("--allowed-emulator", action="append", dest="allowed_emulators", metavar="PATH",
                        help="apparmor: an emulator guests may name (repeatable; default: libvirt's)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING")


def _config(args: argparse.Namespace) -> Config:
    overrides = {
        key: getattr(args, key, None)
        for key in (
            "state_dir", "client_url", "worker_url", "events_url", "local_url", "uri", "slots", "lease_ttl_s",
            "guest_user", "storage_roots", "serialization", "log_level", "workers",
            "metrics_port", "resync_interval_s", "readonly_url", "curve_dir", "curve_server_key",
            "curve_secret_key", "job_history", "allow_insecure_tcp", "max_domains", "max_queued_jobs",
            "max_queued_jobs_per_domain", "allowed_emulators",
        )
    }
    if getattr(args, "deadline", None):
        from virtbroker.common.config import parse_deadlines

        overrides["deadline_s"] = parse_deadlines("--deadline", ",".join(args.deadline))
    if getattr(args, "security", None) is not None:
        overrides["security"] = [d.strip() for d in args.security.split(",") if d.strip()]
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


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when `up` dies, even by kill -9, so no child is orphaned."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: children outlive a killed `up`, as before


def _child(target, config: Config, *extra):
    # Children of `up` log through the parent's handler (multiprocessing-logging) and
    # leave Ctrl-C to the parent, which stops them in order.
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(target(config, *extra))


def cmd_up(args) -> int:
    """The broker, N lifecycle workers and the security workers, in the foreground, one merged log."""
    import multiprocessing_logging

    from virtbroker.broker.server import run_broker
    from virtbroker.workers.lifecycle import run_worker

    config = _config(args)
    setup_logging(config.log_level)
    multiprocessing_logging.install_mp_handler()
    ctx = multiprocessing.get_context("fork")

    specs: list[tuple[str, object, tuple]] = [("broker", run_broker, ())]
    if config.security:
        from virtbroker.workers.security.service import run_security_worker

        specs += [(f"security-{d}", run_security_worker, (d,)) for d in config.security]
    specs += [(f"worker-{i + 1}", run_worker, ()) for i in range(config.workers)]

    children: dict[str, multiprocessing.Process] = {}

    def spawn(name, target, extra):
        proc = ctx.Process(target=_child, args=(target, config, *extra), name=name, daemon=False)
        proc.start()
        children[name] = proc

    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if stopping:
            for proc in children.values():
                if proc.is_alive():
                    proc.kill()
            os._exit(EXIT_ERROR)
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for name, target, extra in specs:
        spawn(name, target, extra)
    log.info("virtbroker up: clients connect at %s or, on this host, %s", config.client_url, config.local_url)
    by_name = {name: (target, extra) for name, target, extra in specs}
    backoff_s = {name: 0.5 for name in by_name}
    restart_at: dict[str, float] = {}
    while not stopping:
        time.sleep(0.2)
        now = time.monotonic()
        for name, proc in list(children.items()):
            if proc.is_alive() or stopping:
                continue
            if name not in restart_at:
                # Like supervisord's backoff: a child that keeps failing is retried less often.
                restart_at[name] = now + backoff_s[name]
                log.error("%s exited with code %s; restarting it in %.1f s", name, proc.exitcode, backoff_s[name])
                backoff_s[name] = min(backoff_s[name] * 2, 30.0)
            elif now >= restart_at.pop(name):
                spawn(name, *by_name[name])
    # Workers first, so they finish their jobs while the broker still listens.
    log.info("stopping")
    order = [n for n in children if n.startswith("worker")] + [n for n in children if n.startswith("security")] + ["broker"]
    for name in order:
        proc = children[name]
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
        proc.join(timeout=40)
        if proc.is_alive():
            log.warning("%s did not stop in time; killing it", name)
            proc.kill()
            proc.join()
    return EXIT_OK


def cmd_demo(args) -> int:
    from virtbroker.launcher.demo import run_demo

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
    _common_options(up)
    up.add_argument("--workers", type=int, help="lifecycle workers to start (default 2)")
    up.set_defaults(func=cmd_up)

    broker = sub.add_parser("broker", help="run the broker alone (for supervisord)")
    _common_options(broker)
    broker.set_defaults(func=cmd_broker)

    worker = sub.add_parser("worker", help="run one lifecycle worker (for supervisord)")
    _common_options(worker)
    worker.add_argument("--worker-id", help="stable id for this worker (default: random)")
    worker.set_defaults(func=cmd_worker)

    sec = sub.add_parser("security-worker", help="run one security worker (for supervisord)")
    _common_options(sec)
    sec.add_argument("--driver", required=True, choices=("dac", "apparmor"))
    sec.add_argument("--worker-id", help="stable id for this worker (default: random)")
    sec.set_defaults(func=cmd_security_worker)

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

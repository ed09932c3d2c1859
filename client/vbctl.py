"""`vbctl`: virsh-like verbs against a virtbroker broker."""

from __future__ import annotations

import argparse
import json
import sys
import time

from virtbroker.client.api import Client
from virtbroker.common import protocol as p
from virtbroker.common.config import default_client_url
from virtbroker.common.errors import VirtbrokerError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

STATE_LABELS = {"running": "running", "paused": "paused", "shutoff": "shut off"}
LIFECYCLE_VERBS = ("start", "shutdown", "destroy", "reboot", "suspend", "resume", "undefine")
VERB_DONE = {
    "start": "started",
    "shutdown": "shut down",
    "destroy": "destroyed",
    "reboot": "rebooted",
    "suspend": "suspended",
    "resume": "resumed",
    "undefine": "undefined",
}


def _print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h)] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    line = "   ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(" " + line.rstrip())
    print("-" * (len(line) + 2))
    for row in rows:
        print(" " + "   ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print()


def cmd_define(c: Client, args) -> int:
    try:
        with open(args.file, encoding="utf-8") as f:
            xml = f.read()
    except OSError as e:
        raise VirtbrokerError(f"cannot read {args.file}: {e.strerror}") from None
    record = c.define(xml, ha=True if args.ha else None)
    if args.json:
        _print_json(record)
    else:
        print(f"Domain '{record['name']}' defined from {args.file}{' (HA)' if args.ha else ''}")
    return EXIT_OK


def cmd_ha(c: Client, args) -> int:
    record = c.set_ha(args.domain, args.mode == "on")
    if args.json:
        _print_json(record)
    else:
        print(f"Domain '{record['name']}' HA {args.mode}")
    return EXIT_OK


def cmd_hosts(c: Client, args) -> int:
    hosts = c.hosts()
    if args.json:
        _print_json(hosts)
    else:
        _table(
            ["Host", "State", "Guests", "Free MiB", "Workers", "Renewed", "Notes"],
            [[h["host"], h["state"], str(h["guests"]), "-" if h["free_mib"] is None else str(h["free_mib"]),
              str(len(h["workers"])),
              f"{h['renewed_s_ago']:.1f} s ago",
              ", ".join(n for n, on in (("draining", h["draining"]), ("embedded", h["embedded"]),
                                        ("HA guests", h["armed"]), ("watchdog", h["watchdog"])) if on)]
             for h in hosts],
        )
    return EXIT_OK


def cmd_host_action(c: Client, args) -> int:
    action = {"host-fence": "fence", "host-evacuate": "evacuate", "host-drain": "drain"}[args.verb]
    if action == "drain" and args.undo:
        action = "undrain"
    if action == "fence" and not args.yes_it_is_off:
        raise VirtbrokerError(f"host-fence needs --yes-it-is-off: say that {args.host} is powered off; "
                              "if it is not, its guests may run twice")
    out = c.host_action(args.host, action, confirm_off=action == "fence")
    if args.json:
        _print_json(out)
    else:
        jobs = f"; start job(s) {', '.join(map(str, out['jobs']))}" if out["jobs"] else ""
        print(f"Host {out['host']}: {out['state']}{', draining' if out['draining'] else ''}{jobs}")
    return EXIT_OK


def cmd_lifecycle(c: Client, args) -> int:
    """start/shutdown/destroy/...: one job per domain named, submitted as one batch; wait
    unless --no-wait. A domain whose submit is refused (unknown domain, idempotency key in
    use) gets its error line, and the others' jobs still run."""
    requests = []
    for domain in args.domains:
        key = args.idempotency_key
        if key and len(args.domains) > 1:
            key = f"{key}:{domain}"  # one key per job: a key names exactly one submission
        requests.append(
            p.Submit(request_id=0, domain=domain, op=args.verb, timeout_s=getattr(args, "timeout", None),
                     idempotency_key=key, deadline_s=args.deadline)
        )
    status = EXIT_OK
    jobs = []
    for domain, job in zip(args.domains, c.call_many(requests)):
        if isinstance(job, VirtbrokerError):
            print(f"error: Failed to {args.verb} domain '{domain}': {job}", file=sys.stderr)
            status = EXIT_FAILED
        else:
            jobs.append(job)
    if args.no_wait:
        for job in jobs:
            print(job["job_id"])
        return status
    finals = _wait_with_progress(c, [j["job_id"] for j in jobs], args.wait_timeout) if jobs else []
    for job in finals:
        if job["state"] == "succeeded":
            print(f"Domain '{job['domain']}' {VERB_DONE[job['op']]}")
        else:
            print(
                f"error: Failed to {job['op']} domain '{job['domain']}': {job['error'] or job['state']}",
                file=sys.stderr,
            )
            status = EXIT_FAILED
    return status


def _wait_with_progress(c: Client, job_ids: list[int], timeout_s: float) -> list[dict]:
    """Wait for the jobs; on a terminal and for several jobs, show a progress bar."""
    if len(job_ids) < 2 or not sys.stderr.isatty():
        return c.wait(job_ids, timeout_s)
    from tqdm import tqdm

    deadline = time.monotonic() + timeout_s
    remaining = set(job_ids)
    with tqdm(total=len(job_ids), unit="job", file=sys.stderr) as bar:
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            status = c.wait_status(sorted(remaining), min(left, 0.5))
            for job in status["jobs"]:
                if job["state"] in ("succeeded", "failed", "cancelled", "lost"):
                    remaining.discard(job["job_id"])
                    bar.update(1)
    return c.wait(job_ids, max(0.0, deadline - time.monotonic()))


def cmd_list(c: Client, args) -> int:
    domains = c.list(all=args.all, state=args.state)
    if args.json:
        _print_json(domains)
        return EXIT_OK
    if args.name:
        for d in domains:
            print(d["name"])
        return EXIT_OK
    _table(
        ["Name", "State", "Host"],
        [[d["name"], STATE_LABELS.get(d["state"], d["state"]), d["host"] or "-"] for d in domains],
    )
    return EXIT_OK


def cmd_dominfo(c: Client, args) -> int:
    info = c.lookup(args.domain)
    if args.json:
        _print_json(info)
        return EXIT_OK
    rows = [
        ("Name", info["name"]),
        ("UUID", info["uuid"]),
        ("State", STATE_LABELS.get(info["state"], info["state"])),
        ("Host", info["host"] or "-"),
        ("Persistent", "yes"),
        ("Generation", info["generation"]),
        ("Epoch", info["epoch"]),
        ("Active job", info["active_job"] if info["active_job"] is not None else "-"),
        ("Queued jobs", ", ".join(map(str, info["pending_jobs"])) or "-"),
    ]
    for key, value in rows:
        print(f"{key + ':':<15}{value}")
    return EXIT_OK


def cmd_dumpxml(c: Client, args) -> int:
    print(c.dumpxml(args.domain, inactive=args.inactive))
    return EXIT_OK


def _job_rows(jobs: list[dict]) -> list[list[str]]:
    return [[j["job_id"], j["op"], j["domain"], j["state"], j["error"] or ""] for j in jobs]


def cmd_jobs(c: Client, args) -> int:
    jobs = c.jobs(domain=args.domain, state=args.state, limit=args.limit)
    if args.json:
        _print_json(jobs)
    else:
        _table(["Job", "Op", "Domain", "State", "Error"], _job_rows(jobs))
    return EXIT_OK


def cmd_job(c: Client, args) -> int:
    job = c.job(args.job_id)
    if args.json:
        _print_json(job)
    else:
        for key in ("job_id", "op", "domain", "uuid", "state", "error", "worker_id", "host"):
            print(f"{key + ':':<12}{job[key] if job[key] is not None else '-'}")
    return EXIT_OK


def cmd_wait(c: Client, args) -> int:
    jobs = c.wait(args.job_ids, args.timeout)
    if args.json:
        _print_json(jobs)
    else:
        _table(["Job", "Op", "Domain", "State", "Error"], _job_rows(jobs))
    return EXIT_OK if all(j["state"] == "succeeded" for j in jobs) else EXIT_FAILED


def cmd_cancel(c: Client, args) -> int:
    job = c.cancel(args.job_id)
    print(f"Job {job['job_id']} cancelled")
    return EXIT_OK


def cmd_brokers(c: Client, args) -> int:
    """Every broker of the --connect list (brokers sharing an etcd store): which one leads,
    its fencing token, the store; one that does not answer is listed as unreachable."""
    rows, out = [], []
    for url in c.urls:
        try:
            with Client(url, timeout_s=2.0, server_key=c.server_key, secret_key=c.secret_key) as one:
                status = one.ping()
        except VirtbrokerError as e:
            status = {"role": "unreachable", "error": str(e)}
        status = {"url": url, **status}
        out.append(status)
        rows.append([url, status.get("role", "leader"), str(status.get("token") or "-"),
                     status.get("store", "sqlite"), str(status.get("revision") or "-"),
                     str(status.get("takeovers", "-"))])
    if args.json:
        _print_json(out)
    else:
        _table(["Broker", "Role", "Token", "Store", "Revision", "Takeovers"], rows)
    return EXIT_OK if any(s.get("role") == "leader" for s in out) else EXIT_FAILED


def cmd_workers(c: Client, args) -> int:
    workers = c.workers()
    if args.json:
        _print_json(workers)
    else:
        _table(
            ["Worker", "Role", "Host", "URI", "Busy"],
            [[w["worker_id"], w["role"] + (f" ({','.join(w['drivers'])})" if w["drivers"] else ""), w["host"], w["uri"],
              f"{w['busy']}/{w['slots']}"] for w in workers],
        )
    return EXIT_OK


def cmd_events(c: Client, args) -> int:
    count = 0
    for event in c.events(timeout_s=args.timeout, since=args.since):
        body = {"type": event.KIND, **event.body()}
        if args.json:
            print(json.dumps(body, sort_keys=True), flush=True)
        elif event.KIND == "domain":
            why = f" ({event.reason})" if event.reason else ""
            print(f"{event.seq} domain {event.name} {event.event} {event.state}{why}", flush=True)
        elif event.KIND == "host":
            print(f"{event.seq} host {event.host_id} {event.state}{' (' + event.reason + ')' if event.reason else ''}",
                  flush=True)
        else:
            print(f"{event.seq} job {event.job_id} {event.op} {event.state}{': ' + event.error if event.error else ''}",
                  flush=True)
        count += 1
        if args.count and count >= args.count:
            break
    return EXIT_OK


def _top_frame(c: Client) -> None:
    running = c.jobs(state="running", limit=1000)
    queued = c.jobs(state="queued", limit=1000)
    workers = c.workers()
    info = c.ping()
    hosts = {w["host"] for w in workers if w["role"] == "lifecycle"}
    busy = sum(w["busy"] for w in workers if w["role"] == "lifecycle")
    slots = sum(w["slots"] for w in workers if w["role"] == "lifecycle")
    print(
        f"virtbroker {time.strftime('%H:%M:%S')}  domains {info['domains']}  workers {len(workers)} on "
        f"{len(hosts)} host(s)  slots {busy}/{slots}  jobs running {len(running)} queued {len(queued)}\n"
    )
    now = time.time()
    _table(
        ["Job", "Op", "Domain", "State", "Age", "Worker"],
        [[j["job_id"], j["op"], j["domain"], j["state"], f"{now - j['submitted_at']:.1f}s", j["worker_id"] or "-"]
         for j in running + queued][:40],
    )
    _table(
        ["Worker", "Role", "Host", "Busy"],
        [[w["worker_id"], w["role"], w["host"], f"{w['busy']}/{w['slots']}"] for w in workers],
    )


def cmd_top(c: Client, args) -> int:
    """Live jobs and workers, refreshed every --interval seconds (Ctrl-C to leave)."""
    clear = sys.stdout.isatty() and not args.once
    while True:
        if clear:
            sys.stdout.write("\x1b[H\x1b[2J")
        _top_frame(c)
        sys.stdout.flush()
        if args.once:
            return EXIT_OK
        time.sleep(args.interval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vbctl", description="virsh-like control of a virtbroker broker")
    parser.add_argument(
        "--connect", "-c", default=None, help=f"broker client URL (default $VIRTBROKER_URL or {default_client_url()})"
    )
    parser.add_argument("--server-key", help="the broker's public CURVE key file (default $VIRTBROKER_SERVER_KEY)")
    parser.add_argument("--client-key", help="this client's secret CURVE key file (default $VIRTBROKER_CLIENT_KEY)")
    parser.add_argument("--timeout-connect", type=float, default=30.0, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("define", help="define a domain from an XML file")
    p.add_argument("file")
    p.add_argument("--ha", action="store_true", help="restart it on another host once its host is fenced")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_define)

    p = sub.add_parser("ha", help="mark a domain HA (restarted elsewhere once its host is fenced) or not")
    p.add_argument("domain")
    p.add_argument("mode", choices=("on", "off"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ha)

    p = sub.add_parser("hosts", help="hosts with their state, capacity, guests and last renewal")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_hosts)

    for verb, help_text in (
        ("host-fence", "say a lost host is powered off: its domains stop, HA ones restart elsewhere"),
        ("host-evacuate", "start every domain of a fenced host on other hosts"),
        ("host-drain", "place no new start on a host (--undo: place again)"),
    ):
        p = sub.add_parser(verb, help=help_text)
        p.add_argument("host")
        if verb == "host-fence":
            p.add_argument("--yes-it-is-off", action="store_true",
                           help="required: the host is off (else guests run twice)")
        if verb == "host-drain":
            p.add_argument("--undo", action="store_true")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_host_action)

    for verb in LIFECYCLE_VERBS:
        p = sub.add_parser(verb, help=f"{verb} one or more domains (by name or UUID)")
        p.add_argument("domains", nargs="+", metavar="DOMAIN")
        p.add_argument("--no-wait", action="store_true", help="print the job id(s) and return")
        p.add_argument("--wait-timeout", type=float, default=600.0, help="seconds to wait for the job(s)")
        p.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
        p.add_argument(
            "--deadline",
            type=float,
            metavar="S",
            help="seconds the job may run before it ends lost (default: the broker's deadline_s for the verb)",
        )
        if verb == "shutdown":
            p.add_argument("--timeout", type=float, help="seconds of ACPI shutdown before destroy")
        p.set_defaults(func=cmd_lifecycle)

    p = sub.add_parser("list", help="list domains (running ones, or --all)")
    p.add_argument("--all", action="store_true")
    p.add_argument("--state", choices=("running", "paused", "shutoff", "unknown", "active", "inactive"))
    p.add_argument("--name", action="store_true", help="names only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("dominfo", help="a domain's record")
    p.add_argument("domain")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dominfo)

    p = sub.add_parser("dumpxml", help="a domain's definition (live one while it runs)")
    p.add_argument("domain")
    p.add_argument("--inactive", action="store_true", help="the definition the next start uses")
    p.set_defaults(func=cmd_dumpxml)

    p = sub.add_parser("jobs", help="recent jobs")
    p.add_argument("--domain")
    p.add_argument("--state")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("job", help="one job")
    p.add_argument("job_id", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("wait", help="wait for jobs to finish; non-zero unless all succeeded")
    p.add_argument("job_ids", type=int, nargs="+", metavar="ID")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("cancel", help="cancel a queued job")
    p.add_argument("job_id", type=int)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("events", help="print domain and job events as they happen")
    p.add_argument("--count", type=int, help="stop after this many events")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--since", type=int, metavar="SEQ",
                   help="first replay every kept event after SEQ, then go on live (each event once)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("top", help="live jobs and workers")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("workers", help="connected workers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("brokers", help="the brokers of the --connect list: which one leads, its token, the store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_brokers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.connect, timeout_s=args.timeout_connect, server_key=args.server_key,
                    secret_key=args.client_key) as c:
            return args.func(c, args)
    except VirtbrokerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

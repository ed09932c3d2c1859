"""The procedures the gateway serves, one handler each, and the dispatch table that names them
all (libvirt's remote_dispatch table is the model): procedure number -> Procedure."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtbroker.gateway import rpc
from virtbroker.gateway.domains import ACTIVE_STATES, ensure_uuid, guest_facts, uuid_raw, uuid_text
from virtbroker.gateway.rpc import RemoteError
from virtbroker.gateway.xdr import Packer, Unpacker

log = logging.getLogger("virtbroker.gateway")

# Where a handler runs: in the connection's own thread (LOOP: touches only the connection;
# READ: one round trip to the broker, answered from its memory), in the job pool (waits for a
# virtbroker job), or in the facts pool (the host's libvirtd, which may be slow).
LOOP, READ, JOB, FACTS = "loop", "read", "job", "facts"

DOMAIN_LIST_MAX = 16384
CPU_BASELINE_MAX = 256
# virtbroker's `unknown` (its host is unreachable) is libvirt's "no state".
DOMAIN_EVENT_STATE = {"running": rpc.STATE_RUNNING, "paused": rpc.STATE_PAUSED, "shutoff": rpc.STATE_SHUTOFF,
                      "unknown": rpc.STATE_NOSTATE}

# virConnectListAllDomainsFlags.
LIST_ACTIVE, LIST_INACTIVE = 1, 2
LIST_PERSISTENT, LIST_TRANSIENT = 4, 8
LIST_RUNNING, LIST_PAUSED, LIST_SHUTOFF, LIST_OTHER = 16, 32, 64, 128
LIST_MANAGEDSAVE, LIST_NO_MANAGEDSAVE = 256, 512
LIST_AUTOSTART, LIST_NO_AUTOSTART = 1024, 2048
LIST_HAS_SNAPSHOT, LIST_NO_SNAPSHOT = 4096, 8192
LIST_HAS_CHECKPOINT, LIST_NO_CHECKPOINT = 16384, 32768
LIST_ALL_FLAGS = 65535

XML_SECURE, XML_INACTIVE, XML_UPDATE_CPU, XML_MIGRATABLE = 1, 2, 4, 8
DEFINE_VALIDATE = 1
START_VALIDATE = 16


@dataclass
class Call:
    """One call being served: its arguments, the gateway, and (for LOOP handlers) the connection."""

    args: Unpacker
    gw: Any  # server.Gateway
    conn: Any  # server.Connection


@dataclass(frozen=True)
class Procedure:
    number: int
    api: str  # the libvirt API, for messages ("read only access prevents virDomainDefineXML")
    handler: Callable[[Call], bytes]
    pool: str
    writes: bool = False
    before_open: bool = False


def check_flags(flags: int, allowed: int, api: str) -> None:
    if flags & ~allowed:
        raise RemoteError(rpc.ERR_INVALID_ARG, f"invalid argument: unsupported flags (0x{flags & ~allowed:x}) in function {api}")


# ------------------------------------------------------------------------------- encoding helpers
def read_dom(u: Unpacker) -> str:
    """remote_nonnull_domain: the uuid is what identifies it."""
    u.string()
    raw = u.opaque_fixed(16)
    u.int()
    return uuid_text(raw)


def pack_dom(pk: Packer, gw, summary: dict) -> Packer:
    domain_id = gw.ids.for_state(summary["uuid"], summary["state"])
    return pk.string(summary["name"]).opaque_fixed(uuid_raw(summary["uuid"])).int(domain_id)


def dom_reply(gw, summary: dict) -> bytes:
    return bytes(pack_dom(Packer(), gw, summary))


def lookup_uuid(gw, uuid: str) -> dict:
    summary = _lookup(gw, uuid)
    if summary is None or summary["uuid"] != uuid:
        raise RemoteError(rpc.ERR_NO_DOMAIN, f"Domain not found: no domain with matching uuid '{uuid}'")
    return summary


def _lookup(gw, key: str) -> dict | None:
    try:
        return gw.broker.call("lookup", key)
    except RemoteError as e:
        if e.code == rpc.ERR_NO_DOMAIN:
            return None
        raise


def args_dom(call: Call, with_flags: bool = False) -> tuple[dict, int]:
    uuid = read_dom(call.args)
    flags = call.args.uint() if with_flags else 0
    call.args.done()
    return lookup_uuid(call.gw, uuid), flags


def void(_call: Call | None = None) -> bytes:
    return b""


def int_reply(value: int) -> bytes:
    return bytes(Packer().int(value))


# ------------------------------------------------------------------------------- connect
def auth_list(call: Call) -> bytes:
    call.args.done()
    return bytes(Packer().uint(1).int(rpc.AUTH_NONE))


SUPPORTED_FEATURES = {rpc.FEATURE_PROGRAM_KEEPALIVE, rpc.FEATURE_REMOTE_EVENT_CALLBACK, rpc.FEATURE_REMOTE_CLOSE_CALLBACK}


def supports_feature(call: Call) -> bytes:
    feature = call.args.int()
    call.args.done()
    # Keepalive (PING gets PONG), callback-based events and close callbacks are served; no
    # migration, fd passing or typed-parameter procedure is.
    return int_reply(1 if feature in SUPPORTED_FEATURES else 0)


def connect_open(call: Call) -> bytes:
    name = call.args.optional_string()
    flags = call.args.uint()
    call.args.done()
    call.conn.open(name, read_only=bool(flags & 1))
    return b""


def connect_close(call: Call) -> bytes:
    call.args.done()
    call.conn.close_requested()
    return b""


def register_close_callback(call: Call) -> bytes:
    call.args.done()
    return b""


def event_register(call: Call) -> bytes:
    event_id = call.args.int()
    has_dom = call.args.bool()
    uuid = read_dom(call.args) if has_dom else None
    call.args.done()
    if not 0 <= event_id < rpc.EVENT_ID_LAST:
        raise RemoteError(rpc.ERR_INVALID_ARG, f"invalid argument: unsupported event ID {event_id}")
    return int_reply(call.conn.add_callback(event_id, uuid))


def event_deregister(call: Call) -> bytes:
    callback_id = call.args.int()
    call.args.done()
    if not call.conn.remove_callback(callback_id):
        raise RemoteError(rpc.ERR_INVALID_ARG, f"invalid argument: callback ID {callback_id} is not registered")
    return b""


# ------------------------------------------------------------------------------- lookups and lists
def lookup_by_name(call: Call) -> bytes:
    name = call.args.string()
    call.args.done()
    summary = _lookup(call.gw, name)
    # The broker also takes a UUID in place of a name; libvirt looks up names only.
    if summary is None or summary["name"] != name:
        raise RemoteError(rpc.ERR_NO_DOMAIN, f"Domain not found: no domain with matching name '{name}'")
    return dom_reply(call.gw, summary)


def lookup_by_uuid(call: Call) -> bytes:
    uuid = uuid_text(call.args.opaque_fixed(16))
    call.args.done()
    return dom_reply(call.gw, lookup_uuid(call.gw, uuid))


def lookup_by_id(call: Call) -> bytes:
    domain_id = call.args.int()
    call.args.done()
    uuid = call.gw.ids.uuid_of(domain_id)
    summary = _lookup(call.gw, uuid) if uuid else None
    if summary is None or summary["state"] not in ACTIVE_STATES:
        raise RemoteError(rpc.ERR_NO_DOMAIN, f"Domain not found: no domain with matching id {domain_id}")
    return dom_reply(call.gw, summary)


def _keep(flags: int, summary: dict, transient: bool) -> bool:
    state = summary["state"]
    active = state in ACTIVE_STATES
    if flags & (LIST_ACTIVE | LIST_INACTIVE) and not (
        (flags & LIST_ACTIVE and active) or (flags & LIST_INACTIVE and not active)
    ):
        return False
    if flags & (LIST_PERSISTENT | LIST_TRANSIENT) and not (
        (flags & LIST_PERSISTENT and not transient) or (flags & LIST_TRANSIENT and transient)
    ):
        return False
    states = flags & (LIST_RUNNING | LIST_PAUSED | LIST_SHUTOFF | LIST_OTHER)
    if states and not (
        (flags & LIST_RUNNING and state == "running")
        or (flags & LIST_PAUSED and state == "paused")
        or (flags & LIST_SHUTOFF and state == "shutoff")
    ):
        return False
    # No guest has a managed save image, autostart, snapshots or checkpoints here.
    for has, has_not in (
        (LIST_MANAGEDSAVE, LIST_NO_MANAGEDSAVE),
        (LIST_AUTOSTART, LIST_NO_AUTOSTART),
        (LIST_HAS_SNAPSHOT, LIST_NO_SNAPSHOT),
        (LIST_HAS_CHECKPOINT, LIST_NO_CHECKPOINT),
    ):
        if flags & (has | has_not) and not flags & has_not:
            return False
    return True


def list_all_domains(call: Call) -> bytes:
    need_results = call.args.int()
    flags = call.args.uint()
    call.args.done()
    check_flags(flags, LIST_ALL_FLAGS, "virConnectListAllDomains")
    gw = call.gw
    listing = [d for d in gw.broker.call("list", all=True) if _keep(flags, d, gw.ids.is_transient(d["uuid"]))]
    if len(listing) > DOMAIN_LIST_MAX:
        raise RemoteError(rpc.ERR_RPC, f"too many domains: {len(listing)} for limit {DOMAIN_LIST_MAX}", rpc.FROM_RPC)
    pk = Packer()
    if need_results:
        pk.uint(len(listing))
        for d in listing:
            pack_dom(pk, gw, d)
    else:
        pk.uint(0)
    return bytes(pk.uint(len(listing)))


def _count(call: Call, active: bool) -> bytes:
    call.args.done()
    listing = call.gw.broker.call("list", state="active" if active else "inactive")
    return int_reply(len(listing))


def list_domain_ids(call: Call) -> bytes:
    """The pre-0.9.13 listing of active guests' ids (virConnectListDomains)."""
    max_ids = call.args.int()
    call.args.done()
    if not 0 <= max_ids <= DOMAIN_LIST_MAX:
        raise RemoteError(rpc.ERR_RPC, f"too many domains requested: {max_ids} for limit {DOMAIN_LIST_MAX}", rpc.FROM_RPC)
    listing = call.gw.broker.call("list", state="active")[:max_ids]
    pk = Packer().uint(len(listing))
    for d in listing:
        pk.int(call.gw.ids.for_state(d["uuid"], d["state"]))
    return bytes(pk)


def list_defined_names(call: Call) -> bytes:
    """The pre-0.9.13 listing of inactive guests' names (virConnectListDefinedDomains)."""
    max_names = call.args.int()
    call.args.done()
    if not 0 <= max_names <= DOMAIN_LIST_MAX:
        raise RemoteError(rpc.ERR_RPC, f"too many domains requested: {max_names} for limit {DOMAIN_LIST_MAX}", rpc.FROM_RPC)
    listing = call.gw.broker.call("list", state="inactive")[:max_names]
    pk = Packer().uint(len(listing))
    for d in listing:
        pk.string(d["name"])
    return bytes(pk)


# ------------------------------------------------------------------------------- domain reads
def get_state(call: Call) -> bytes:
    summary, flags = args_dom(call, with_flags=True)
    check_flags(flags, 0, "virDomainGetState")
    state = summary["state"]
    reason = {"running": rpc.REASON_RUNNING_BOOTED, "paused": rpc.REASON_PAUSED_USER}.get(state, rpc.REASON_SHUTOFF_UNKNOWN)
    return bytes(Packer().int(DOMAIN_EVENT_STATE[state]).int(reason))


def get_info(call: Call) -> bytes:
    summary, _ = args_dom(call)
    xml = call.gw.broker.call("dumpxml", summary["uuid"])
    max_kib, cur_kib, vcpus, _os = guest_facts(xml)
    active = summary["state"] in ACTIVE_STATES
    # cpuTime is not tracked by virtbroker: 0.
    return bytes(
        Packer().int(DOMAIN_EVENT_STATE[summary["state"]]).uhyper(max_kib).uhyper(cur_kib if active else 0)
        .int(vcpus).uhyper(0)
    )


def get_os_type(call: Call) -> bytes:
    summary, _ = args_dom(call)
    return bytes(Packer().string(guest_facts(call.gw.broker.call("dumpxml", summary["uuid"]))[3]))


def is_active(call: Call) -> bytes:
    summary, _ = args_dom(call)
    return int_reply(1 if summary["state"] in ACTIVE_STATES else 0)


def is_persistent(call: Call) -> bytes:
    summary, _ = args_dom(call)
    return int_reply(0 if call.gw.ids.is_transient(summary["uuid"]) else 1)


def get_autostart(call: Call) -> bytes:
    args_dom(call)
    return int_reply(0)


def zero_with_flags(call: Call) -> bytes:
    """HAS_MANAGED_SAVE_IMAGE, SNAPSHOT_NUM: virtbroker keeps neither."""
    args_dom(call, with_flags=True)
    return int_reply(0)


def get_messages(call: Call) -> bytes:
    args_dom(call, with_flags=True)
    return bytes(Packer().uint(0))


def node_security_model(call: Call) -> bytes:
    # An empty model: virsh then asks for no label. virtbroker's drivers label outside libvirt.
    call.args.done()
    return bytes(Packer().char_array("").char_array(""))


def get_xml_desc(call: Call) -> bytes:
    summary, flags = args_dom(call, with_flags=True)
    check_flags(flags, XML_SECURE | XML_INACTIVE | XML_UPDATE_CPU | XML_MIGRATABLE, "virDomainGetXMLDesc")
    xml = call.gw.broker.call("dumpxml", summary["uuid"], inactive=bool(flags & XML_INACTIVE))
    return bytes(Packer().string(xml))


# ------------------------------------------------------------------------------- changes
def _define(call: Call, xml: str) -> bytes:
    gw = call.gw
    # The XML goes to the broker as it came (the broker parses and checks it once).
    summary = gw.broker.call("define", xml, invalid_code=rpc.ERR_XML_ERROR)
    # A transient guest defined again becomes persistent (virt-install: createXML, then defineXML).
    gw.ids.unmark_transient(summary["uuid"])
    return dom_reply(gw, summary)


def ensure_uuid_or_xml_error(xml: str) -> tuple[str, str]:
    from virtbroker.common.errors import InvalidError

    try:
        return ensure_uuid(xml)
    except InvalidError as e:
        raise RemoteError(rpc.ERR_XML_ERROR, f"XML error: {e.message}") from e


def define_xml(call: Call) -> bytes:
    xml = call.args.string()
    call.args.done()
    return _define(call, xml)


def define_xml_flags(call: Call) -> bytes:
    xml = call.args.string()
    flags = call.args.uint()
    call.args.done()
    # virtbroker checks every definition against libvirt's schema, so VALIDATE always holds.
    check_flags(flags, DEFINE_VALIDATE, "virDomainDefineXMLFlags")
    return _define(call, xml)


def undefine(call: Call, with_flags: bool) -> bytes:
    summary, flags = args_dom(call, with_flags)
    # Managed save, snapshot and checkpoint metadata, NVRAM and TPM state: virtbroker keeps none.
    check_flags(flags, 0x7F, "virDomainUndefineFlags")
    gw = call.gw
    if gw.ids.is_transient(summary["uuid"]):
        raise RemoteError(rpc.ERR_OPERATION_INVALID, "Requested operation is not valid: cannot undefine transient domain")
    if summary["state"] in ACTIVE_STATES:
        # libvirt keeps a running guest going as a transient one; so does the gateway, which
        # undefines it in virtbroker when it stops.
        gw.ids.mark_transient(summary["uuid"])
        from virtbroker.gateway.events import Lifecycle

        gw.publish(Lifecycle(rpc.EVENT_ID_LIFECYCLE, summary["uuid"], summary["name"], summary["state"],
                             rpc.EV_UNDEFINED, rpc.DETAIL_UNDEFINED_REMOVED))
        return b""
    gw.broker.run_job(summary["uuid"], "undefine")
    return b""


def create(call: Call, with_flags: bool) -> bytes:
    summary, flags = args_dom(call, with_flags)
    check_flags(flags, 0, "virDomainCreateWithFlags")
    if summary["state"] in ACTIVE_STATES:
        raise RemoteError(rpc.ERR_OPERATION_INVALID, "Requested operation is not valid: domain is already running")
    call.gw.broker.run_job(summary["uuid"], "start")
    if with_flags:
        return dom_reply(call.gw, call.gw.broker.call("lookup", summary["uuid"]))
    return b""


def create_xml(call: Call) -> bytes:
    xml = call.args.string()
    flags = call.args.uint()
    call.args.done()
    check_flags(flags, START_VALIDATE, "virDomainCreateXML")
    gw = call.gw
    xml, uuid = ensure_uuid_or_xml_error(xml)
    existing = _lookup(gw, uuid)
    if existing is not None and existing["uuid"] == uuid:
        # libvirt starts a defined inactive domain from the new XML; virtbroker keeps one definition.
        raise RemoteError(rpc.ERR_OPERATION_INVALID,
                          f"Requested operation is not valid: domain '{existing['name']}' is already defined")
    gw.ids.mark_transient(uuid)
    try:
        summary = gw.broker.call("define", xml, invalid_code=rpc.ERR_XML_ERROR)
    except RemoteError:
        gw.ids.unmark_transient(uuid)
        raise
    try:
        gw.broker.run_job(uuid, "start")
    except RemoteError:
        # A transient guest that did not start leaves nothing behind, as in libvirt.
        try:
            gw.broker.run_job(uuid, "undefine")
        except RemoteError as e:
            log.warning("could not undefine transient %s after its failed start: %s", summary["name"], e)
        raise
    return dom_reply(gw, gw.broker.call("lookup", uuid))


def job_call(op: str, with_flags: bool, allowed_flags: int = 0, api: str = "") -> Callable[[Call], bytes]:
    def handler(call: Call) -> bytes:
        summary, flags = args_dom(call, with_flags)
        check_flags(flags, allowed_flags, api)
        call.gw.broker.run_job(summary["uuid"], op)
        return b""

    return handler


def set_autostart(call: Call) -> bytes:
    read_dom(call.args)
    call.args.int()
    call.args.done()
    raise RemoteError(rpc.ERR_NO_SUPPORT, "this function is not supported by the connection driver: virDomainSetAutostart "
                      "(virtbroker starts guests only when asked)")


# ------------------------------------------------------------------------------- host facts
def facts_call(fn: Callable) -> Callable[[Call], bytes]:
    def handler(call: Call) -> bytes:
        return fn(call, call.gw.facts)

    return handler


def _caps(call, facts):
    call.args.done()
    return bytes(Packer().string(facts.ask(lambda c: c.getCapabilities())))


def _domcaps(call, facts):
    u = call.args
    emulator, arch, machine, virttype = u.optional_string(), u.optional_string(), u.optional_string(), u.optional_string()
    flags = u.uint()
    u.done()
    # libvirtd refuses domain capabilities on a read-only connection; this getter is all the
    # read-write one is used for.
    caps = facts.ask(lambda c: c.getDomainCapabilities(emulator, arch, machine, virttype, flags), read_write=True)
    return bytes(Packer().string(caps))


def _version(call, facts):
    call.args.done()
    return bytes(Packer().uhyper(facts.ask(lambda c: c.getVersion())))


def _lib_version(call, facts):
    call.args.done()
    return bytes(Packer().uhyper(facts.ask(lambda c: c.getLibVersion())))


def _type(call, facts):
    call.args.done()
    return bytes(Packer().string(facts.ask(lambda c: c.getType())))


def _hostname(call, facts):
    call.args.done()
    return bytes(Packer().string(facts.ask(lambda c: c.getHostname())))


def _max_vcpus(call, facts):
    kind = call.args.optional_string()
    call.args.done()
    return int_reply(facts.ask(lambda c: c.getMaxVcpus(kind)))


def _node_info(call, facts):
    call.args.done()
    model, memory_mib, cpus, mhz, nodes, sockets, cores, threads = facts.ask(lambda c: c.getInfo())
    return bytes(
        Packer().char_array(model, fixed=32).uhyper(memory_mib * 1024).int(cpus).int(mhz).int(nodes).int(sockets)
        .int(cores).int(threads)
    )


def _cpu_list(u: Unpacker) -> list[str]:
    return [u.string() for _ in range(u.array_length(CPU_BASELINE_MAX))]


def _baseline_cpu(call, facts):
    cpus = _cpu_list(call.args)
    flags = call.args.uint()
    call.args.done()
    return bytes(Packer().string(facts.ask(lambda c: c.baselineCPU(cpus, flags))))


def _baseline_hypervisor_cpu(call, facts):
    u = call.args
    emulator, arch, machine, virttype = u.optional_string(), u.optional_string(), u.optional_string(), u.optional_string()
    cpus = _cpu_list(u)
    flags = u.uint()
    u.done()
    return bytes(Packer().string(facts.ask(lambda c: c.baselineHypervisorCPU(emulator, arch, machine, virttype, cpus, flags))))


def refuse_storage(call: Call) -> bytes:
    # virt-install then treats disk paths as plain files and never tries to create a pool.
    raise rpc.no_support(rpc.PROC_CONNECT_LIST_ALL_STORAGE_POOLS)


# ------------------------------------------------------------------------------- the table
def _table() -> dict[int, Procedure]:
    r = rpc
    entries = [
        Procedure(r.PROC_AUTH_LIST, "virConnectAuthList", auth_list, LOOP, before_open=True),
        Procedure(r.PROC_CONNECT_SUPPORTS_FEATURE, "virConnectSupportsFeature", supports_feature, LOOP, before_open=True),
        Procedure(r.PROC_CONNECT_OPEN, "virConnectOpen", connect_open, LOOP, before_open=True),
        Procedure(r.PROC_CONNECT_CLOSE, "virConnectClose", connect_close, LOOP),
        Procedure(r.PROC_CONNECT_REGISTER_CLOSE_CALLBACK, "virConnectRegisterCloseCallback", register_close_callback, LOOP),
        Procedure(r.PROC_CONNECT_UNREGISTER_CLOSE_CALLBACK, "virConnectUnregisterCloseCallback", register_close_callback, LOOP),
        Procedure(r.PROC_CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY, "virConnectDomainEventRegisterAny", event_register, LOOP),
        Procedure(r.PROC_CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY, "virConnectDomainEventDeregisterAny", event_deregister, LOOP),
        Procedure(r.PROC_NODE_GET_SECURITY_MODEL, "virNodeGetSecurityModel", node_security_model, LOOP),
        Procedure(r.PROC_DOMAIN_LOOKUP_BY_NAME, "virDomainLookupByName", lookup_by_name, READ),
        Procedure(r.PROC_DOMAIN_LOOKUP_BY_UUID, "virDomainLookupByUUID", lookup_by_uuid, READ),
        Procedure(r.PROC_DOMAIN_LOOKUP_BY_ID, "virDomainLookupByID", lookup_by_id, READ),
        Procedure(r.PROC_CONNECT_LIST_ALL_DOMAINS, "virConnectListAllDomains", list_all_domains, READ),
        Procedure(r.PROC_CONNECT_NUM_OF_DOMAINS, "virConnectNumOfDomains", lambda c: _count(c, True), READ),
        Procedure(r.PROC_CONNECT_NUM_OF_DEFINED_DOMAINS, "virConnectNumOfDefinedDomains", lambda c: _count(c, False), READ),
        Procedure(r.PROC_CONNECT_LIST_DOMAINS, "virConnectListDomains", list_domain_ids, READ),
        Procedure(r.PROC_CONNECT_LIST_DEFINED_DOMAINS, "virConnectListDefinedDomains", list_defined_names, READ),
        Procedure(r.PROC_DOMAIN_GET_STATE, "virDomainGetState", get_state, READ),
        Procedure(r.PROC_DOMAIN_GET_INFO, "virDomainGetInfo", get_info, READ),
        Procedure(r.PROC_DOMAIN_GET_OS_TYPE, "virDomainGetOSType", get_os_type, READ),
        Procedure(r.PROC_DOMAIN_IS_ACTIVE, "virDomainIsActive", is_active, READ),
        Procedure(r.PROC_DOMAIN_IS_PERSISTENT, "virDomainIsPersistent", is_persistent, READ),
        Procedure(r.PROC_DOMAIN_GET_AUTOSTART, "virDomainGetAutostart", get_autostart, READ),
        Procedure(r.PROC_DOMAIN_HAS_MANAGED_SAVE_IMAGE, "virDomainHasManagedSaveImage", zero_with_flags, READ),
        Procedure(r.PROC_DOMAIN_SNAPSHOT_NUM, "virDomainSnapshotNum", zero_with_flags, READ),
        Procedure(r.PROC_DOMAIN_GET_MESSAGES, "virDomainGetMessages", get_messages, READ),
        Procedure(r.PROC_DOMAIN_GET_XML_DESC, "virDomainGetXMLDesc", get_xml_desc, READ),
        Procedure(r.PROC_DOMAIN_DEFINE_XML, "virDomainDefineXML", define_xml, READ, writes=True),
        Procedure(r.PROC_DOMAIN_DEFINE_XML_FLAGS, "virDomainDefineXMLFlags", define_xml_flags, READ, writes=True),
        Procedure(r.PROC_DOMAIN_UNDEFINE, "virDomainUndefine", lambda c: undefine(c, False), JOB, writes=True),
        Procedure(r.PROC_DOMAIN_UNDEFINE_FLAGS, "virDomainUndefineFlags", lambda c: undefine(c, True), JOB, writes=True),
        Procedure(r.PROC_DOMAIN_CREATE, "virDomainCreate", lambda c: create(c, False), JOB, writes=True),
        Procedure(r.PROC_DOMAIN_CREATE_WITH_FLAGS, "virDomainCreateWithFlags", lambda c: create(c, True), JOB, writes=True),
        Procedure(r.PROC_DOMAIN_CREATE_XML, "virDomainCreateXML", create_xml, JOB, writes=True),
        Procedure(r.PROC_DOMAIN_SHUTDOWN, "virDomainShutdown", job_call("shutdown", False), JOB, writes=True),
        Procedure(r.PROC_DOMAIN_SHUTDOWN_FLAGS, "virDomainShutdownFlags",
                  job_call("shutdown", True, 1, "virDomainShutdownFlags"), JOB, writes=True),  # ACPI only
        Procedure(r.PROC_DOMAIN_DESTROY, "virDomainDestroy", job_call("destroy", False), JOB, writes=True),
        Procedure(r.PROC_DOMAIN_DESTROY_FLAGS, "virDomainDestroyFlags",
                  job_call("destroy", True, 1, "virDomainDestroyFlags"), JOB, writes=True),  # GRACEFUL
        Procedure(r.PROC_DOMAIN_REBOOT, "virDomainReboot", job_call("reboot", True, 1, "virDomainReboot"), JOB, writes=True),
        Procedure(r.PROC_DOMAIN_SUSPEND, "virDomainSuspend", job_call("suspend", False), JOB, writes=True),
        Procedure(r.PROC_DOMAIN_RESUME, "virDomainResume", job_call("resume", False), JOB, writes=True),
        Procedure(r.PROC_DOMAIN_SET_AUTOSTART, "virDomainSetAutostart", set_autostart, LOOP, writes=True),
        Procedure(r.PROC_CONNECT_GET_CAPABILITIES, "virConnectGetCapabilities", facts_call(_caps), FACTS),
        Procedure(r.PROC_CONNECT_GET_DOMAIN_CAPABILITIES, "virConnectGetDomainCapabilities", facts_call(_domcaps), FACTS),
        Procedure(r.PROC_CONNECT_GET_VERSION, "virConnectGetVersion", facts_call(_version), FACTS),
        Procedure(r.PROC_CONNECT_GET_LIB_VERSION, "virConnectGetLibVersion", facts_call(_lib_version), FACTS),
        Procedure(r.PROC_CONNECT_GET_TYPE, "virConnectGetType", facts_call(_type), FACTS),
        Procedure(r.PROC_CONNECT_GET_HOSTNAME, "virConnectGetHostname", facts_call(_hostname), FACTS),
        Procedure(r.PROC_CONNECT_GET_MAX_VCPUS, "virConnectGetMaxVcpus", facts_call(_max_vcpus), FACTS),
        Procedure(r.PROC_NODE_GET_INFO, "virNodeGetInfo", facts_call(_node_info), FACTS),
        Procedure(r.PROC_CONNECT_BASELINE_CPU, "virConnectBaselineCPU", facts_call(_baseline_cpu), FACTS),
        Procedure(r.PROC_CONNECT_BASELINE_HYPERVISOR_CPU, "virConnectBaselineHypervisorCPU",
                  facts_call(_baseline_hypervisor_cpu), FACTS),
        Procedure(r.PROC_CONNECT_LIST_ALL_STORAGE_POOLS, "virConnectListAllStoragePools", refuse_storage, LOOP),
    ]
    return {e.number: e for e in entries}


DISPATCH: dict[int, Procedure] = _table()

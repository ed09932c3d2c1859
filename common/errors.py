"""One error hierarchy for broker, workers and clients; each error carries a wire code."""


class VirtbrokerError(Exception):
    """Root of every error virtbroker raises on purpose."""

    code = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(VirtbrokerError):
    """A configuration file or command-line option is wrong."""

    code = "config"


class ProtocolError(VirtbrokerError):
    """A message could not be decoded; carries what was received (dramatiq's DecodeError)."""

    code = "protocol"

    def __init__(self, message: str, received: object = None):
        super().__init__(message)
        self.received = received


class InvalidError(VirtbrokerError):
    """The request is well formed but its content is not acceptable (bad XML, bad name)."""

    code = "invalid"


class NotFoundError(VirtbrokerError):
    """No domain, job or worker matches."""

    code = "not-found"


class ConflictError(VirtbrokerError):
    """The request collides with existing state (name or UUID taken, idempotency clash)."""

    code = "conflict"


class OperationInvalidError(VirtbrokerError):
    """The operation is not valid in the domain's current state (libvirt's VIR_ERR_OPERATION_INVALID)."""

    code = "operation-invalid"


class LeaseError(VirtbrokerError):
    """A result or renewal named a lease that is not current (stale epoch, expired)."""

    code = "lease"


class PermissionError_(VirtbrokerError):
    """The endpoint or key used may not make this request (read-only endpoint, wrong key)."""

    code = "permission"


class DriverError(VirtbrokerError):
    """A hypervisor or security driver failed; the libvirt or OS error is the cause."""

    code = "driver"


class SecurityError(DriverError):
    """A security driver refused or failed to label a resource."""

    code = "security"


class TimeoutError_(VirtbrokerError):
    """No answer within the deadline (the broker is down, or the job is still running)."""

    code = "timeout"


class UnavailableError(VirtbrokerError):
    """The broker could not be reached, or no worker can take the job."""

    code = "unavailable"


class OperationFailedError(VirtbrokerError):
    """The operation cannot be carried out as things are (libvirt's VIR_ERR_OPERATION_FAILED):
    e.g. no host has room for a guest to start."""

    code = "operation-failed"


class NotLeaderError(UnavailableError):
    """A standby broker's answer: nothing was done; the leader is at `leader` (a URL), if any."""

    code = "not-leader"

    def __init__(self, message: str, leader: str | None = None):
        super().__init__(message)
        self.leader = leader


class GoneError(VirtbrokerError):
    """What was asked for is no longer kept (events older than the broker's event history):
    re-read the state instead, as after Kubernetes' 410 Gone."""

    code = "gone"


class LimitError(VirtbrokerError):
    """A configured limit (max_domains, max_queued_jobs) would be passed: nothing was changed."""

    code = "limit"


ERRORS_BY_CODE = {
    cls.code: cls
    for cls in (
        VirtbrokerError,
        ConfigError,
        ProtocolError,
        InvalidError,
        NotFoundError,
        ConflictError,
        OperationInvalidError,
        LeaseError,
        PermissionError_,
        DriverError,
        SecurityError,
        TimeoutError_,
        UnavailableError,
        LimitError,
        OperationFailedError,
        GoneError,
        NotLeaderError,
    )
}


def error_from_code(code: str, message: str) -> VirtbrokerError:
    """Rebuild the typed error a peer reported on the wire."""
    return ERRORS_BY_CODE.get(code, VirtbrokerError)(message)

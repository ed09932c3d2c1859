"""CURVE keys: where they live, how peers use them, and who may connect to which endpoint.

Layout of the broker's curve_dir (made by `virtbroker keygen`):
  server.key, server.key_secret   the broker's own certificate
  keys/NAME.key[_secret]          certificates made for clients and workers (copy the
                                  secret file to the machine that uses it)
  clients/NAME.key                public keys allowed on the client and read-only endpoints
  workers/NAME.key                public keys allowed on the worker endpoint; each carries
                                  the worker's role and host in its metadata, and the broker
                                  takes them from there, never from the worker's hello
  readonly/NAME.key               public keys allowed on the read-only and event endpoints only
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass

import zmq
import zmq.auth

from virtbroker.common.errors import ConfigError

log = logging.getLogger("virtbroker.curve")

ROLES = ("client", "worker", "readonly")
WORKER_ROLES = ("lifecycle", "security")
# A worker key's metadata, as `key = "value"` lines of the certificate's metadata section.
_METADATA_LINE = re.compile(r'^\s+(role|host)\s*=\s*"?([^"]*?)"?\s*$')
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
_HOST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:/-]{0,255}$")  # e.g. HOSTNAME/qemu, as workers report it


@dataclass(frozen=True)
class WorkerKey:
    """What a worker key says of its holder (recorded by keygen, read by the broker)."""

    name: str
    role: str  # lifecycle or security
    host: str


def check_tcp_security(urls: list[str], curve: bool, allow_insecure_tcp: bool, how: str) -> None:
    """Refuse a tcp:// endpoint without CURVE: anyone who reaches the port would be a peer."""
    plain = [u for u in urls if u.startswith("tcp://")]
    if plain and not curve:
        if not allow_insecure_tcp:
            raise ConfigError(
                f"{plain[0]} is a tcp:// endpoint without CURVE: give {how}, or set allow_insecure_tcp = true"
            )
        log.warning(
            "insecure: %s without CURVE (allow_insecure_tcp = true): anyone who reaches it is a peer",
            ", ".join(plain),
        )
ROLE_DIRS = {"client": "clients", "worker": "workers", "readonly": "readonly"}

# Which key directories each endpoint's ZAP domain accepts.
DOMAIN_DIRS = {
    "clients": ("clients",),
    "workers": ("workers",),
    "readonly": ("clients", "readonly"),
    "events": ("clients", "readonly"),
}


def _load(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load CURVE key {path}: {e}") from None
    if secret and secret_key is None:
        raise ConfigError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret_key


def use_as_client(sock: zmq.Socket, server_key_path: str, secret_key_path: str) -> None:
    """Make a connecting socket authenticate with its own certificate to the broker's key."""
    server_public, _ = _load(server_key_path, secret=False)
    public, secret = _load(secret_key_path, secret=True)
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def read_worker_key(path: str) -> WorkerKey:
    """A worker's public key file and the role and host keygen recorded in it."""
    found: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                match = _METADATA_LINE.match(line.rstrip("\n"))
                if match:
                    found[match.group(1)] = match.group(2)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read worker key {path}: {e}") from None
    name = os.path.basename(path).removesuffix(".key")
    if found.get("role") not in WORKER_ROLES or not found.get("host"):
        raise ConfigError(
            f"worker key {path} records no role and host: make it again with "
            f"`virtbroker keygen DIR --worker {name} --role lifecycle|security --host HOST`"
        )
    return WorkerKey(name=name, role=found["role"], host=found["host"])


class KeyPolicy:
    """ZAP credentials provider: a key is allowed in a domain if its file is in one of the domain's dirs.

    Worker keys without a recorded role and host are not allowed at all (the broker would
    have to believe the worker's own word for them).
    """

    def __init__(self, curve_dir: str):
        self.worker_keys: dict[bytes, WorkerKey] = {}  # public key (z85) -> what its file records
        folder = os.path.join(curve_dir, "workers")
        if os.path.isdir(folder):
            for entry in sorted(os.listdir(folder)):
                if entry.endswith(".key"):
                    path = os.path.join(folder, entry)
                    public, _ = _load(path, secret=False)
                    self.worker_keys[public] = read_worker_key(path)
        self.allowed: dict[str, set[bytes]] = {}
        for domain, dirs in DOMAIN_DIRS.items():
            keys: set[bytes] = set()
            for name in dirs:
                if name == "workers":
                    keys.update(self.worker_keys)
                    continue
                folder = os.path.join(curve_dir, name)
                if os.path.isdir(folder):
                    keys.update(zmq.auth.load_certificates(folder).keys())
            self.allowed[domain] = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed.get(domain, ())


class CurveServer:
    """The broker's side: one ZAP authenticator thread (pyzmq's) and the server certificate."""

    def __init__(self, context: zmq.Context, curve_dir: str):
        from zmq.auth.thread import ThreadAuthenticator

        self.public, self.secret = _load(os.path.join(curve_dir, "server.key_secret"), secret=True)
        policy = KeyPolicy(curve_dir)
        # A worker's messages carry its key as their User-Id (z85, pyzmq's ZAP handler's
        # default, which is also how certificate files hold keys); the broker reads role and
        # host from here.
        self.worker_keys = dict(policy.worker_keys)
        self.auth = ThreadAuthenticator(context)
        self.auth.start()
        for domain in DOMAIN_DIRS:
            self.auth.configure_curve_callback(domain=domain, credentials_provider=policy)

    def secure(self, sock: zmq.Socket, domain: str) -> None:
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

    def stop(self) -> None:
        self.auth.stop()


def _add_metadata(path: str, metadata: dict[str, str]) -> None:
    """Write `key = "value"` lines into the metadata section of a certificate file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = "".join(f'    {k} = "{v}"\n' for k, v in metadata.items())
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace("metadata\n", "metadata\n" + lines, 1))


def keygen(
    curve_dir: str,
    role: str | None = None,
    name: str | None = None,
    worker_role: str | None = None,
    host: str | None = None,
) -> list[str]:
    """Create the server certificate if absent; with role and name, a peer's certificate, authorized.

    A worker's certificate records its worker_role (lifecycle or security) and host, which
    the broker believes instead of what the worker says.
    """
    made = []
    os.makedirs(curve_dir, mode=0o700, exist_ok=True)
    if not os.path.exists(os.path.join(curve_dir, "server.key_secret")):
        public, secret = zmq.auth.create_certificates(curve_dir, "server")
        os.chmod(secret, 0o600)
        made += [public, secret]
    if role is None:
        return made
    if role not in ROLES or not name or not _PLAIN_NAME.match(name):
        raise ConfigError(f"keygen needs a role ({', '.join(ROLES)}) and a plain name (letters, digits, _.@-)")
    metadata = None
    if role == "worker":
        if worker_role not in WORKER_ROLES or not host or not _HOST_ID.match(host):
            raise ConfigError("a worker key needs --role lifecycle|security and --host HOST (the worker's host id)")
        metadata = {"role": worker_role, "host": host}
    elif worker_role or host:
        raise ConfigError("--role and --host are for worker keys only")
    keys_dir = os.path.join(curve_dir, "keys")
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(keys_dir, f"{name}.key")):
        raise ConfigError(f"a key named {name} exists already in {keys_dir}")
    public, secret = zmq.auth.create_certificates(keys_dir, name, metadata=metadata)
    os.chmod(secret, 0o600)
    if metadata:
        _add_metadata(public, metadata)  # pyzmq writes metadata into the secret file only
    role_dir = os.path.join(curve_dir, ROLE_DIRS[role])
    os.makedirs(role_dir, mode=0o700, exist_ok=True)
    shutil.copy(public, os.path.join(role_dir, f"{name}.key"))
    return made + [public, secret, os.path.join(role_dir, f"{name}.key")]

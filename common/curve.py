"""CURVE keys: where they live, how peers use them, and who may connect to which endpoint.

Layout of the broker's curve_dir (made by `virtbroker keygen`):
  server.key, server.key_secret   the broker's own certificate
  keys/NAME.key[_secret]          certificates made for clients and workers (copy the
                                  secret file to the machine that uses it)
  clients/NAME.key                public keys allowed on the client and read-only endpoints
  workers/NAME.key                public keys allowed on the worker endpoint
  readonly/NAME.key               public keys allowed on the read-only and event endpoints only
"""

from __future__ import annotations

import os
import shutil

import zmq
import zmq.auth

from common.errors import ConfigError

ROLES = ("client", "worker", "readonly")
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


class KeyPolicy:
    """ZAP credentials provider: a key is allowed in a domain if its file is in one of the domain's dirs."""

    def __init__(self, curve_dir: str):
        self.allowed: dict[str, set[bytes]] = {}
        for domain, dirs in DOMAIN_DIRS.items():
            keys: set[bytes] = set()
            for name in dirs:
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
        self.auth = ThreadAuthenticator(context)
        self.auth.start()
        policy = KeyPolicy(curve_dir)
        for domain in DOMAIN_DIRS:
            self.auth.configure_curve_callback(domain=domain, credentials_provider=policy)

    def secure(self, sock: zmq.Socket, domain: str) -> None:
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

    def stop(self) -> None:
        self.auth.stop()


def keygen(curve_dir: str, role: str | None = None, name: str | None = None) -> list[str]:
    """Create the server certificate if absent; with role and name, a peer's certificate, authorized."""
    made = []
    os.makedirs(curve_dir, mode=0o700, exist_ok=True)
    if not os.path.exists(os.path.join(curve_dir, "server.key_secret")):
        public, secret = zmq.auth.create_certificates(curve_dir, "server")
        os.chmod(secret, 0o600)
        made += [public, secret]
    if role is None:
        return made
    if role not in ROLES or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"keygen needs a role ({', '.join(ROLES)}) and a plain name")
    keys_dir = os.path.join(curve_dir, "keys")
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(keys_dir, f"{name}.key")):
        raise ConfigError(f"a key named {name} exists already in {keys_dir}")
    public, secret = zmq.auth.create_certificates(keys_dir, name)
    os.chmod(secret, 0o600)
    role_dir = os.path.join(curve_dir, ROLE_DIRS[role])
    os.makedirs(role_dir, mode=0o700, exist_ok=True)
    shutil.copy(public, os.path.join(role_dir, f"{name}.key"))
    return made + [public, secret, os.path.join(role_dir, f"{name}.key")]

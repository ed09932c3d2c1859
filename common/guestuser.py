"""The user and group QEMU runs as when the DAC driver is on (guest_user = USER[:GROUP])."""

from __future__ import annotations

import grp
import pwd

from virtbroker.common.errors import ConfigError


def guest_ids(spec: str) -> tuple[int, int]:
    """USER[:GROUP] -> (uid, gid); the group defaults to the user's primary group."""
    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ConfigError(f"guest user '{user}' does not exist") from None
    if not group:
        return pw.pw_uid, pw.pw_gid
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"guest group '{group}' does not exist") from None
    if pw.pw_uid == 0 or gid == 0:
        raise ConfigError(f"guest_user '{spec}' is root: QEMU must not run as root")
    return pw.pw_uid, gid

"""Roles, passwords and permissions, PasswordAuthenticator-style.

`Roles` starts with the superuser `cassandra`/`cassandra`, as Scylla and
Cassandra do. `authenticate(token)` checks a SASL PLAIN token
(`\\0user\\0password`); `authorize(role, permission, keyspace, table)`
raises `Unauthorized` unless the role is a superuser or was granted the
permission on the table, its keyspace or all keyspaces. Permission names
are lowercased CQL names (`select`, `modify`, `create`, `drop`, `alter`,
`authorize`; `all` grants every one).

Passwords are kept as salted SHA-256 digests; this is a test tool, but
there is no reason to keep them in clear text. Not thread-safe: used only
from the emulator's event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field

from coalesce.emulator.errors import BadCredentials, InvalidRequest, Unauthorized

__all__ = ["PASSWORD_AUTHENTICATOR", "Role", "Roles", "resource_name"]

PASSWORD_AUTHENTICATOR = "org.apache.cassandra.auth.PasswordAuthenticator"
_ALL_PERMISSIONS = frozenset(["select", "modify", "create", "drop", "alter", "authorize"])


def _digest(salt: bytes, password: str) -> bytes:
    return hashlib.sha256(salt + password.encode("utf-8")).digest()


@dataclass(slots=True)
class Role:
    name: str
    login: bool = False
    superuser: bool = False
    salt: bytes = field(default_factory=lambda: os.urandom(16))
    digest: bytes | None = None
    # Granted (permission, resource) pairs; resource is "data", "data/ks" or "data/ks/t".
    grants: set[tuple[str, str]] = field(default_factory=set)

    def set_password(self, password: str) -> None:
        self.digest = _digest(self.salt, password)

    def password_matches(self, password: str) -> bool:
        return self.digest is not None and hmac.compare_digest(
            self.digest, _digest(self.salt, password)
        )


def resource_name(resource: tuple[str | None, ...]) -> str:
    """A GRANT resource tuple as a path: "data", "data/ks" or "data/ks/t"."""
    if resource[0] == "all keyspaces":
        return "data"
    if resource[0] == "keyspace":
        return f"data/{resource[1]}"
    return f"data/{resource[1]}/{resource[2]}"


class Roles:
    """The role catalogue; see the module docstring."""

    def __init__(self) -> None:
        self._roles: dict[str, Role] = {}
        superuser = Role("cassandra", login=True, superuser=True)
        superuser.set_password("cassandra")
        self._roles["cassandra"] = superuser

    def get(self, name: str) -> Role | None:
        return self._roles.get(name)

    def authenticate(self, token: bytes | None) -> str:
        """Check a SASL PLAIN token; return the role name or raise `BadCredentials`."""
        parts = (token or b"").split(b"\x00")
        if len(parts) != 3:
            raise BadCredentials("Authentication failed: malformed PLAIN token")
        try:
            user, password = parts[1].decode("utf-8"), parts[2].decode("utf-8")
        except UnicodeDecodeError:
            raise BadCredentials("Provided username and/or password are incorrect") from None
        role = self._roles.get(user)
        if role is None or not role.login or not role.password_matches(password):
            raise BadCredentials("Provided username and/or password are incorrect")
        return user

    def create(
        self,
        name: str,
        *,
        password: str | None,
        login: bool | None,
        superuser: bool | None,
        if_not_exists: bool,
    ) -> bool:
        """Add a role; False if it exists and `if_not_exists`, else `InvalidRequest`."""
        if name in self._roles:
            if if_not_exists:
                return False
            raise InvalidRequest(f"{name} already exists")
        role = Role(name, login=bool(login), superuser=bool(superuser))
        if password is not None:
            role.set_password(password)
        self._roles[name] = role
        return True

    def alter(
        self, name: str, *, password: str | None, login: bool | None, superuser: bool | None
    ) -> None:
        role = self._require(name)
        if password is not None:
            role.set_password(password)
        if login is not None:
            role.login = login
        if superuser is not None:
            role.superuser = superuser

    def drop(self, name: str, if_exists: bool) -> None:
        if name not in self._roles:
            if if_exists:
                return
            raise InvalidRequest(f"{name} doesn't exist")
        del self._roles[name]

    def grant(self, name: str, permission: str, resource: str) -> None:
        role = self._require(name)
        for each in _expand(permission):
            role.grants.add((each, resource))

    def revoke(self, name: str, permission: str, resource: str) -> None:
        role = self._require(name)
        for each in _expand(permission):
            role.grants.discard((each, resource))

    def _require(self, name: str) -> Role:
        role = self._roles.get(name)
        if role is None:
            raise InvalidRequest(f"{name} doesn't exist")
        return role

    def is_superuser(self, name: str) -> bool:
        role = self._roles.get(name)
        return role is not None and role.superuser

    def authorize(
        self, name: str, permission: str, keyspace: str | None, table: str | None = None
    ) -> None:
        """Raise `Unauthorized` unless role `name` holds `permission` on the resource."""
        role = self._roles.get(name)
        if role is None:
            raise Unauthorized(f"User {name} has no {permission.upper()} permission")
        if role.superuser:
            return
        candidates = ["data"]
        if keyspace is not None:
            candidates.append(f"data/{keyspace}")
            if table is not None:
                candidates.append(f"data/{keyspace}/{table}")
        if any((permission, resource) in role.grants for resource in candidates):
            return
        target = candidates[-1].replace("data/", "").replace("/", ".")
        shown = (
            f"<table {target}>"
            if table is not None
            else (f"<keyspace {target}>" if keyspace is not None else "<all keyspaces>")
        )
        raise Unauthorized(
            f"User {name} has no {permission.upper()} permission on {shown} or any of its parents"
        )


def _expand(permission: str) -> list[str]:
    if permission == "all":
        return sorted(_ALL_PERMISSIONS)
    return [permission]

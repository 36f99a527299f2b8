"""`LoginRelay`: one client's login, verified by Scylla on a fresh upstream connection.

The sidecar never checks a password itself: Scylla does. While Scylla is known to ask
for credentials (learned by every probe of a node, and asked again when no upstream
connection is open), the client's STARTUP is answered by the sidecar with Scylla's
own AUTHENTICATE, so a client that never sends credentials costs nothing upstream
while the sidecar is connected. Its AUTH_RESPONSE opens a new upstream connection
(at most ``max_logins`` at once), goes to Scylla as is, and Scylla's answer comes back:
AUTH_SUCCESS, AUTH_CHALLENGE (relayed; the exchange goes on on that connection) or an
ERROR. On success the role is the user of the SASL PLAIN token, the token is kept (in
memory, never logged) to open more connections for that role, and the logged-in
connection joins the role's pool.
"""

from __future__ import annotations

from coalesce.cql import (
    Authenticate,
    AuthResponse,
    AuthSuccess,
    Error,
    ErrorCode,
    Frame,
    Opcode,
)
from coalesce.sidecar.connection import UpstreamConnection
from coalesce.sidecar.errors import UpstreamRefused
from coalesce.sidecar.upstream import Upstream, plain_username

__all__ = ["LoginRelay"]


def _reply(opcode: int, body: bytes) -> Frame:
    return Frame(4, True, 0, 0, opcode, body)


class LoginRelay:
    """The upstream side of one client's login; `role` is set once it succeeded.

    `start` and `respond` return the frame to send the client and raise
    `UpstreamError` when Scylla cannot be reached. One step at a time, as the protocol
    has it. `close` drops the connection of a login that did not finish.
    """

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._conn: UpstreamConnection | None = None
        self.role: str | None = None
        self.waiting = False  # Scylla (or the sidecar on its behalf) expects AUTH_RESPONSE

    async def start(self) -> Frame:
        """The answer to STARTUP: READY (no login needed), AUTHENTICATE or ERROR."""
        upstream = self._upstream
        if upstream.auth_required is None or not upstream.connected:
            # Not learned yet, or nothing open upstream to vouch that it still holds
            # (the node may have restarted with logins turned on): ask a node.
            async with upstream.logins:
                conn, reply = await upstream.open_login()
            conn.close()
            upstream.learn_auth(reply)
            if upstream.auth_required is None:
                return reply
        if upstream.auth_required:
            self.waiting = True
            return _reply(Opcode.AUTHENTICATE, Authenticate(upstream.authenticator).encode())
        self.role = ""
        return _reply(Opcode.READY, b"")

    async def respond(self, body: bytes) -> Frame:
        """Relay one AUTH_RESPONSE body; AUTH_SUCCESS, AUTH_CHALLENGE or ERROR comes back."""
        upstream = self._upstream
        if not self.waiting:
            raise UpstreamRefused("no login in progress",
                                  Error(ErrorCode.PROTOCOL_ERROR, "no login in progress").encode())
        conn = self._conn
        try:
            if conn is None:
                async with upstream.logins:
                    conn, reply = await upstream.open_login()
                    self._conn = conn
                    upstream.learn_auth(reply)
                    if reply.opcode == Opcode.READY:  # Scylla stopped asking for logins
                        self._conn = None
                        self.waiting = False
                        await upstream.learn_node(conn)
                        upstream.adopt(conn, "", None)
                        self.role = ""
                        return _reply(Opcode.AUTH_SUCCESS, AuthSuccess(None).encode())
                    if reply.opcode != Opcode.AUTHENTICATE:
                        self.close()
                        return reply
                    reply = await conn.request(Opcode.AUTH_RESPONSE, body)
            else:
                reply = await conn.request(Opcode.AUTH_RESPONSE, body)
        except BaseException:
            self.close()
            raise
        if reply.opcode == Opcode.AUTH_CHALLENGE:
            return reply
        self._conn = None
        self.waiting = False
        if reply.opcode != Opcode.AUTH_SUCCESS:
            conn.close()
            return reply
        token = AuthResponse.decode(body).token
        role = plain_username(token)
        if role is None:
            conn.close()
            return _reply(Opcode.ERROR, Error(
                ErrorCode.BAD_CREDENTIALS, "the sidecar relays SASL PLAIN logins only"
            ).encode())
        try:
            await upstream.learn_node(conn)
        except BaseException:
            conn.close()
            raise
        upstream.adopt(conn, role, token)
        self.role = role
        return reply

    def close(self) -> None:
        self.waiting = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None

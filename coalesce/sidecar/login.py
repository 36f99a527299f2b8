"""`LoginRelay`: one client's login, relayed to Scylla on a fresh upstream connection.

The sidecar never checks a password itself: Scylla does. The client's STARTUP opens a
new upstream connection; if Scylla asks for credentials, its AUTHENTICATE goes back to
the client, and each AUTH_RESPONSE goes to Scylla as is, until Scylla answers
AUTH_SUCCESS or an ERROR. On success the role is the user of the SASL PLAIN token,
the token is kept (in memory, never logged) to open more connections for that role,
and the logged-in connection joins the role's pool.
"""

from __future__ import annotations

from coalesce.cql import AuthResponse, Error, ErrorCode, Frame, Opcode
from coalesce.sidecar.errors import UpstreamRefused
from coalesce.sidecar.pool import Upstream, plain_username
from coalesce.sidecar.upstream import UpstreamConnection

__all__ = ["LoginRelay"]


class LoginRelay:
    """The upstream side of one client's login; `role` is set once it succeeded.

    `start` and `respond` return the frame to relay to the client and raise
    `UpstreamError` when Scylla cannot be reached. Not for concurrent use: one step
    at a time, as the protocol has it. `close` drops the connection of a login that
    did not finish (the client left, or Scylla said no).
    """

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._conn: UpstreamConnection | None = None
        self.role: str | None = None

    @property
    def waiting(self) -> bool:
        """Scylla expects an AUTH_RESPONSE."""
        return self._conn is not None

    async def start(self) -> Frame:
        """STARTUP on a fresh connection: READY (no login needed), AUTHENTICATE or ERROR."""
        upstream = self._upstream
        conn, reply = await upstream.open_login()
        if reply.opcode == Opcode.READY:
            upstream.auth_required = False
            upstream.adopt(conn, "", None)
            self.role = ""
        elif reply.opcode == Opcode.AUTHENTICATE:
            upstream.auth_required = True
            self._conn = conn
        else:
            conn.close()
        return reply

    async def respond(self, body: bytes) -> Frame:
        """Relay one AUTH_RESPONSE body; AUTH_SUCCESS, AUTH_CHALLENGE or ERROR comes back."""
        conn = self._conn
        if conn is None:
            raise UpstreamRefused("no login in progress",
                                  Error(ErrorCode.PROTOCOL_ERROR, "no login in progress").encode())
        try:
            reply = await conn.request(Opcode.AUTH_RESPONSE, body)
        except BaseException:
            self.close()
            raise
        if reply.opcode == Opcode.AUTH_CHALLENGE:
            return reply
        self._conn = None
        if reply.opcode != Opcode.AUTH_SUCCESS:
            conn.close()
            return reply
        token = AuthResponse.decode(body).token
        role = plain_username(token)
        if role is None:
            conn.close()
            return Frame(4, True, 0, 0, Opcode.ERROR, Error(
                ErrorCode.BAD_CREDENTIALS, "the sidecar relays SASL PLAIN logins only"
            ).encode())
        self._upstream.adopt(conn, role, token)
        self.role = role
        return reply

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

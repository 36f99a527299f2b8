"""Recursive-descent parser for the emulator's CQL subset.

`parse(text)` returns one `Statement` (a trailing `;` is allowed). It raises
`CqlSyntaxError` for text that is not CQL and `InvalidRequest` for CQL the
emulator recognises but does not implement (ALTER TABLE, secondary indexes,
user types, ...). It never raises anything else, whatever the input.

Keywords are case-insensitive; unquoted identifiers are lowercased and
quoted ones keep their case, as in Cassandra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NoReturn, TypeVar

from coalesce.emulator.errors import CqlSyntaxError, InvalidRequest
from coalesce.emulator.lexer import Token, TokenKind, tokenize
from coalesce.emulator.statements import (
    AlterRole,
    Assignment,
    Batch,
    BindMarker,
    Condition,
    Constant,
    CreateKeyspace,
    CreateRole,
    CreateTable,
    Delete,
    DropKeyspace,
    DropRole,
    DropTable,
    FunctionCall,
    Grant,
    InList,
    Insert,
    ListLiteral,
    MapLiteral,
    Relation,
    Select,
    Selector,
    SetLiteral,
    Statement,
    TableRef,
    Term,
    Truncate,
    TupleLiteral,
    Update,
    Use,
)

__all__ = ["parse"]

_T = TypeVar("_T")

# Words that cannot be used unquoted as identifiers; everything else
# (`key`, `type`, `count`, `ttl`, ...) may name a column, as in Cassandra.
_RESERVED = frozenset(
    [
        "add",
        "allow",
        "alter",
        "and",
        "apply",
        "asc",
        "authorize",
        "batch",
        "begin",
        "by",
        "columnfamily",
        "create",
        "delete",
        "desc",
        "describe",
        "drop",
        "entries",
        "execute",
        "from",
        "full",
        "grant",
        "if",
        "in",
        "index",
        "infinity",
        "insert",
        "into",
        "is",
        "keyspace",
        "limit",
        "modify",
        "nan",
        "norecursive",
        "not",
        "null",
        "of",
        "on",
        "or",
        "order",
        "primary",
        "rename",
        "revoke",
        "schema",
        "select",
        "set",
        "table",
        "to",
        "token",
        "truncate",
        "unlogged",
        "update",
        "use",
        "using",
        "values",
        "where",
        "with",
    ]
)
_UNSUPPORTED_DDL = {
    "index": "secondary indexes",
    "custom": "secondary indexes",
    "type": "user-defined types",
    "materialized": "materialized views",
    "function": "user-defined functions",
    "aggregate": "user-defined aggregates",
    "trigger": "triggers",
}
_PERMISSIONS = frozenset(
    ["all", "select", "modify", "create", "alter", "drop", "authorize", "describe", "execute"]
)


def parse(text: str) -> Statement:
    """Parse one CQL statement; see the module docstring for the error contract."""
    try:
        return _Parser(text).statement()
    except (CqlSyntaxError, InvalidRequest):
        raise
    except RecursionError:
        raise CqlSyntaxError("statement is nested too deeply") from None


class _Parser:
    def __init__(self, text: str) -> None:
        self._text = text
        self._tokens = tokenize(text)
        self._i = 0
        self._markers = 0

    # ---------------------------------------------------------------- cursor

    def _peek(self, ahead: int = 0) -> Token:
        return self._tokens[min(self._i + ahead, len(self._tokens) - 1)]

    def _next(self) -> Token:
        token = self._peek()
        if token.kind is not TokenKind.EOF:
            self._i += 1
        return token

    def _where(self, token: Token) -> str:
        line = self._text.count("\n", 0, token.pos) + 1
        col = token.pos - (self._text.rfind("\n", 0, token.pos) + 1)
        return f"line {line}:{col}"

    def _fail(self, expecting: str | None = None, token: Token | None = None) -> NoReturn:
        token = token or self._peek()
        if token.kind is TokenKind.EOF:
            shown = "<EOF>"
        elif token.kind is TokenKind.IDENT:
            shown = self._text[token.pos : token.pos + len(token.text)]
        else:
            shown = token.text
        if expecting:
            raise CqlSyntaxError(
                f"{self._where(token)} mismatched input '{shown}' expecting {expecting}"
            )
        raise CqlSyntaxError(f"{self._where(token)} no viable alternative at input '{shown}'")

    def _is_kw(self, word: str, ahead: int = 0) -> bool:
        token = self._peek(ahead)
        return token.kind is TokenKind.IDENT and token.text == word

    def _accept_kw(self, *words: str) -> bool:
        for offset, word in enumerate(words):
            if not self._is_kw(word, offset):
                return False
        self._i += len(words)
        return True

    def _expect_kw(self, *words: str) -> None:
        for word in words:
            if not self._is_kw(word):
                self._fail(word.upper())
            self._i += 1

    def _is_punct(self, punct: str, ahead: int = 0) -> bool:
        token = self._peek(ahead)
        return token.kind is TokenKind.PUNCT and token.text == punct

    def _accept_punct(self, punct: str) -> bool:
        if self._is_punct(punct):
            self._i += 1
            return True
        return False

    def _expect_punct(self, punct: str) -> None:
        if not self._accept_punct(punct):
            self._fail(f"'{punct}'")

    def _ident(self) -> str:
        token = self._peek()
        if token.kind is TokenKind.QUOTED_IDENT or (
            token.kind is TokenKind.IDENT and token.text not in _RESERVED
        ):
            self._i += 1
            return token.text
        self._fail("an identifier")

    def _table_ref(self) -> TableRef:
        first = self._ident()
        if self._accept_punct("."):
            return TableRef(first, self._ident())
        return TableRef(None, first)

    def _comma_separated(self, item: Callable[[], _T], close: str) -> list[_T]:
        items: list[_T] = []
        if self._accept_punct(close):
            return items
        while True:
            items.append(item())
            if self._accept_punct(close):
                return items
            self._expect_punct(",")

    # ------------------------------------------------------------ statements

    def statement(self) -> Statement:
        token = self._peek()
        if token.kind is not TokenKind.IDENT:
            self._fail()
        handlers: dict[str, Callable[[], Statement]] = {
            "select": self._select,
            "insert": self._insert,
            "update": self._update,
            "delete": self._delete,
            "begin": self._batch,
            "create": self._create,
            "drop": self._drop,
            "truncate": self._truncate,
            "use": self._use,
            "grant": self._grant,
            "revoke": self._grant,
            "alter": self._alter,
        }
        handler = handlers.get(token.text)
        if handler is None:
            self._fail()
        statement = handler()
        self._accept_punct(";")
        if self._peek().kind is not TokenKind.EOF:
            self._fail()
        return statement

    def _use(self) -> Use:
        self._expect_kw("use")
        return Use(self._ident())

    def _truncate(self) -> Truncate:
        self._expect_kw("truncate")
        self._accept_kw("table") or self._accept_kw("columnfamily")
        return Truncate(self._table_ref())

    def _create(self) -> Statement:
        self._expect_kw("create")
        if self._accept_kw("keyspace") or self._accept_kw("schema"):
            return self._create_keyspace()
        if self._accept_kw("table") or self._accept_kw("columnfamily"):
            return self._create_table()
        if self._accept_kw("role"):
            return self._create_role(user=False)
        if self._accept_kw("user"):
            return self._create_role(user=True)
        what = _UNSUPPORTED_DDL.get(self._peek().text)
        if what is not None and self._peek().kind is TokenKind.IDENT:
            raise InvalidRequest(f"{what} are not supported by the coalesce emulator")
        self._fail()

    def _drop(self) -> Statement:
        self._expect_kw("drop")
        if self._accept_kw("keyspace") or self._accept_kw("schema"):
            if_exists = self._accept_kw("if", "exists")
            return DropKeyspace(self._ident(), if_exists)
        if self._accept_kw("table") or self._accept_kw("columnfamily"):
            if_exists = self._accept_kw("if", "exists")
            return DropTable(self._table_ref(), if_exists)
        if self._accept_kw("role") or self._accept_kw("user"):
            if_exists = self._accept_kw("if", "exists")
            return DropRole(self._role_name(), if_exists)
        what = _UNSUPPORTED_DDL.get(self._peek().text)
        if what is not None and self._peek().kind is TokenKind.IDENT:
            raise InvalidRequest(f"{what} are not supported by the coalesce emulator")
        self._fail()

    def _alter(self) -> Statement:
        self._expect_kw("alter")
        if self._accept_kw("role") or self._accept_kw("user"):
            name = self._role_name()
            password, login, superuser = self._role_options()
            return AlterRole(name, password, login, superuser)
        if self._peek().kind is TokenKind.IDENT and self._peek().text in (
            "table",
            "keyspace",
            "type",
            "materialized",
            "columnfamily",
            "schema",
        ):
            raise InvalidRequest("ALTER is not supported by the coalesce emulator")
        self._fail()

    def _create_keyspace(self) -> CreateKeyspace:
        if_not_exists = self._accept_kw("if", "not", "exists")
        name = self._ident()
        self._expect_kw("with")
        properties = self._properties()
        replication_term = properties.pop("replication", None)
        if not isinstance(replication_term, MapLiteral):
            raise CqlSyntaxError("Missing mandatory replication strategy class")
        replication = {
            _constant_text(key): _constant_text(value) for key, value in replication_term.items
        }
        durable = properties.pop("durable_writes", Constant("boolean", "true"))
        if properties:
            raise CqlSyntaxError(f"Unknown property '{next(iter(properties))}'")
        if "class" not in replication:
            raise InvalidRequest("Missing mandatory replication strategy class")
        return CreateKeyspace(
            name, if_not_exists, replication, _constant_text(durable).lower() == "true"
        )

    def _properties(self) -> dict[str, Term]:
        """`name = value [AND name = value ...]` after WITH."""
        properties: dict[str, Term] = {}
        while True:
            name = self._ident()
            self._expect_punct("=")
            if self._peek().kind is TokenKind.IDENT and not self._is_punct("(", 1):
                value: Term = Constant("string", self._next().text)
            else:
                value = self._term()
            properties[name] = value
            if not self._accept_kw("and"):
                return properties

    def _type(self) -> str:
        token = self._next()
        if token.kind is not TokenKind.IDENT:
            self._fail("a native or collection type", token)
        name = token.text
        if not self._accept_punct("<"):
            return name
        args = [self._type()]
        while self._accept_punct(","):
            args.append(self._type())
        self._expect_punct(">")
        return f"{name}<{', '.join(args)}>"

    def _create_table(self) -> CreateTable:
        if_not_exists = self._accept_kw("if", "not", "exists")
        table = self._table_ref()
        self._expect_punct("(")
        columns: list[tuple[str, str, bool]] = []
        partition_key: list[str] = []
        clustering: list[str] = []
        while True:
            if self._accept_kw("primary", "key"):
                if partition_key:
                    raise InvalidRequest("Multiple PRIMARY KEYs specified (exactly one required)")
                self._expect_punct("(")
                if self._accept_punct("("):
                    partition_key.extend(self._comma_separated(self._ident, ")"))
                else:
                    partition_key.append(self._ident())
                while self._accept_punct(","):
                    clustering.append(self._ident())
                self._expect_punct(")")
            else:
                name = self._ident()
                type_text = self._type()
                static = self._accept_kw("static")
                if self._accept_kw("primary", "key"):
                    if partition_key:
                        raise InvalidRequest(
                            "Multiple PRIMARY KEYs specified (exactly one required)"
                        )
                    partition_key.append(name)
                columns.append((name, type_text, static))
            if self._accept_punct(")"):
                break
            self._expect_punct(",")
        order: dict[str, str] = {}
        options: dict[str, str] = {}
        if self._accept_kw("with"):
            while True:
                if self._accept_kw("clustering", "order", "by"):
                    self._expect_punct("(")
                    for column, direction in self._comma_separated(self._ordering, ")"):
                        order[column] = direction
                elif self._accept_kw("compact", "storage"):
                    raise InvalidRequest(
                        "COMPACT STORAGE is not supported by the coalesce emulator"
                    )
                else:
                    for name, value in self._properties().items():
                        options[name] = _render_term(value)
                    break
                if not self._accept_kw("and"):
                    break
        if not partition_key:
            raise InvalidRequest("No PRIMARY KEY specifed (exactly one required)")
        return CreateTable(
            table,
            if_not_exists,
            tuple(columns),
            tuple(partition_key),
            tuple(clustering),
            order,
            options,
        )

    def _ordering(self) -> tuple[str, str]:
        column = self._ident()
        if self._accept_kw("desc"):
            return column, "DESC"
        self._accept_kw("asc")
        return column, "ASC"

    def _using(self) -> tuple[Term | None, Term | None]:
        ttl: Term | None = None
        timestamp: Term | None = None
        while True:
            if self._accept_kw("ttl"):
                ttl = self._term()
            elif self._accept_kw("timestamp"):
                timestamp = self._term()
            elif self._accept_kw("timeout"):
                self._timeout()
            else:
                self._fail("TTL, TIMESTAMP or TIMEOUT")
            if not self._accept_kw("and"):
                return ttl, timestamp

    def _timeout(self) -> None:
        """Scylla's `USING TIMEOUT <duration>`: checked, then ignored (nothing times out here)."""
        token = self._peek()
        if token.kind is TokenKind.DURATION:
            self._i += 1
            return
        if self._is_punct("?") or self._is_punct(":"):
            raise InvalidRequest(
                "USING TIMEOUT with a bind marker is not supported by the coalesce emulator"
            )
        self._fail("a duration")

    def _insert(self) -> Insert:
        self._expect_kw("insert", "into")
        table = self._table_ref()
        if self._is_kw("json"):
            raise InvalidRequest("INSERT JSON is not supported by the coalesce emulator")
        self._expect_punct("(")
        columns = self._comma_separated(self._ident, ")")
        self._expect_kw("values")
        self._expect_punct("(")
        values = self._comma_separated(self._term, ")")
        if len(columns) != len(values):
            raise InvalidRequest("Unmatched column names/values")
        if not columns:
            self._fail("an identifier")
        if_not_exists = self._accept_kw("if", "not", "exists")
        ttl: Term | None = None
        timestamp: Term | None = None
        if self._accept_kw("using"):
            ttl, timestamp = self._using()
        if not if_not_exists:
            if_not_exists = self._accept_kw("if", "not", "exists")
        return Insert(table, tuple(columns), tuple(values), if_not_exists, ttl, timestamp)

    def _update(self) -> Update:
        self._expect_kw("update")
        table = self._table_ref()
        ttl: Term | None = None
        timestamp: Term | None = None
        if self._accept_kw("using"):
            ttl, timestamp = self._using()
        self._expect_kw("set")
        assignments = [self._assignment()]
        while self._accept_punct(","):
            assignments.append(self._assignment())
        self._expect_kw("where")
        where = self._relations()
        if_exists, conditions = self._conditions()
        return Update(
            table, tuple(assignments), tuple(where), if_exists, tuple(conditions), ttl, timestamp
        )

    def _assignment(self) -> Assignment:
        column = self._ident()
        if self._accept_punct("["):
            key = self._term()
            self._expect_punct("]")
            self._expect_punct("=")
            return Assignment(column, "set_element", self._term(), key)
        self._expect_punct("=")
        token = self._peek()
        same_column = (
            token.kind in (TokenKind.IDENT, TokenKind.QUOTED_IDENT)
            and token.text == column
            and (self._is_punct("+", 1) or self._is_punct("-", 1))
        )
        if same_column:
            self._next()
            kind: Literal["add", "remove"] = "add" if self._next().text == "+" else "remove"
            return Assignment(column, kind, self._term())
        value = self._term()
        if self._accept_punct("+"):
            other = self._ident()
            if other != column:
                raise InvalidRequest(f"Invalid operation ({column} = {other} + ...)")
            return Assignment(column, "prepend", value)
        return Assignment(column, "set", value)

    def _delete(self) -> Delete:
        self._expect_kw("delete")
        columns: list[tuple[str, Term | None]] = []
        if not self._is_kw("from"):
            while True:
                name = self._ident()
                key: Term | None = None
                if self._accept_punct("["):
                    key = self._term()
                    self._expect_punct("]")
                columns.append((name, key))
                if not self._accept_punct(","):
                    break
        self._expect_kw("from")
        table = self._table_ref()
        timestamp: Term | None = None
        if self._accept_kw("using"):
            ttl, timestamp = self._using()
            if ttl is not None:
                raise InvalidRequest("TTL attribute is not allowed for deletes")
        self._expect_kw("where")
        where = self._relations()
        if_exists, conditions = self._conditions()
        return Delete(table, tuple(columns), tuple(where), if_exists, tuple(conditions), timestamp)

    def _conditions(self) -> tuple[bool, list[Condition]]:
        if not self._accept_kw("if"):
            return False, []
        if self._accept_kw("exists"):
            return True, []
        conditions: list[Condition] = []
        while True:
            column = self._ident()
            op, value = self._operator_and_value()
            conditions.append(Condition(column, op, value))
            if not self._accept_kw("and"):
                return False, conditions

    def _select(self) -> Select:
        self._expect_kw("select")
        is_json = self._accept_kw("json")
        distinct = self._accept_kw("distinct")
        selectors: list[Selector] = []
        if not self._accept_punct("*"):
            selectors.append(self._selector())
            while self._accept_punct(","):
                selectors.append(self._selector())
        self._expect_kw("from")
        table = self._table_ref()
        where: list[Relation] = []
        if self._accept_kw("where"):
            where = self._relations()
        order_by: list[tuple[str, str]] = []
        if self._accept_kw("order", "by"):
            order_by.append(self._ordering())
            while self._accept_punct(","):
                order_by.append(self._ordering())
        per_partition_limit: Term | None = None
        if self._accept_kw("per", "partition", "limit"):
            per_partition_limit = self._term()
        limit: Term | None = None
        if self._accept_kw("limit"):
            limit = self._term()
        allow_filtering = self._accept_kw("allow", "filtering")
        # Scylla's extensions, accepted and ignored: the emulator has no cache to
        # bypass and never times a request out.
        self._accept_kw("bypass", "cache")
        if self._accept_kw("using"):
            self._expect_kw("timeout")
            self._timeout()
        return Select(
            table,
            tuple(selectors),
            tuple(where),
            tuple(order_by),
            limit,
            per_partition_limit,
            distinct,
            allow_filtering,
            is_json,
        )

    def _selector(self) -> Selector:
        token = self._peek()
        if token.kind is TokenKind.IDENT and self._is_punct("(", 1):
            self._i += 2
            if token.text == "count":
                if not self._accept_punct("*"):
                    argument = self._next()
                    if argument.text != "1" and argument.kind not in (
                        TokenKind.IDENT,
                        TokenKind.QUOTED_IDENT,
                    ):
                        self._fail("'*'", argument)
                self._expect_punct(")")
                selector = Selector("count", None)
            elif token.text in ("writetime", "ttl"):
                column = self._ident()
                self._expect_punct(")")
                selector = Selector("writetime" if token.text == "writetime" else "ttl", column)
            else:
                raise InvalidRequest(f"Unknown function '{token.text}'")
        else:
            selector = Selector("column", self._ident())
        if self._accept_kw("as"):
            return Selector(selector.kind, selector.column, self._ident())
        return selector

    def _relations(self) -> list[Relation]:
        relations = [self._relation()]
        while self._accept_kw("and"):
            relations.append(self._relation())
        return relations

    def _relation(self) -> Relation:
        if self._is_kw("token") and self._is_punct("(", 1):
            raise InvalidRequest("token() restrictions are not supported by the coalesce emulator")
        if self._is_punct("("):
            raise InvalidRequest(
                "multi-column restrictions are not supported by the coalesce emulator"
            )
        column = self._ident()
        if self._is_kw("contains"):
            raise InvalidRequest("CONTAINS restrictions are not supported by the coalesce emulator")
        op, value = self._operator_and_value()
        if op == "!=":
            raise InvalidRequest(f'Unsupported "!=" relation: {column} != ...')
        return Relation(column, op, value)

    def _operator_and_value(self) -> tuple[str, Term | InList]:
        if self._accept_kw("in"):
            if self._is_punct("?") or self._is_punct(":"):
                return "IN", self._term()
            self._expect_punct("(")
            return "IN", InList(tuple(self._comma_separated(self._term, ")")))
        token = self._next()
        if token.kind is not TokenKind.PUNCT or token.text not in ("=", "<", "<=", ">", ">=", "!="):
            self._fail("an operator", token)
        return token.text, self._term()

    def _batch(self) -> Batch:
        self._expect_kw("begin")
        kind: Literal["logged", "unlogged", "counter"] = "logged"
        if self._accept_kw("unlogged"):
            kind = "unlogged"
        elif self._accept_kw("counter"):
            kind = "counter"
        else:
            self._accept_kw("logged")
        self._expect_kw("batch")
        timestamp: Term | None = None
        if self._accept_kw("using"):
            ttl, timestamp = self._using()
            if ttl is not None:
                raise InvalidRequest("TTL attribute is not allowed on a BATCH")
        statements: list[Insert | Update | Delete] = []
        while not self._is_kw("apply"):
            if self._is_kw("insert"):
                statements.append(self._insert())
            elif self._is_kw("update"):
                statements.append(self._update())
            elif self._is_kw("delete"):
                statements.append(self._delete())
            else:
                self._fail("INSERT, UPDATE, DELETE or APPLY")
            self._accept_punct(";")
        self._expect_kw("apply", "batch")
        return Batch(kind, tuple(statements), timestamp)

    # ----------------------------------------------------------------- roles

    def _role_name(self) -> str:
        token = self._peek()
        if token.kind is TokenKind.STRING:
            self._i += 1
            return token.text
        return self._ident()

    def _role_options(self) -> tuple[str | None, bool | None, bool | None]:
        password: str | None = None
        login: bool | None = None
        superuser: bool | None = None
        if not self._accept_kw("with"):
            return password, login, superuser
        while True:
            if self._accept_kw("password"):
                self._expect_punct("=")
                password = self._string()
            elif self._accept_kw("login"):
                self._expect_punct("=")
                login = self._boolean()
            elif self._accept_kw("superuser"):
                self._expect_punct("=")
                superuser = self._boolean()
            elif self._accept_kw("options"):
                self._expect_punct("=")
                self._term()
            else:
                self._fail("PASSWORD, LOGIN, SUPERUSER or OPTIONS")
            if not self._accept_kw("and"):
                return password, login, superuser

    def _create_role(self, *, user: bool) -> CreateRole:
        if_not_exists = self._accept_kw("if", "not", "exists")
        name = self._role_name()
        if not user:
            password, login, superuser = self._role_options()
            return CreateRole(name, if_not_exists, password, login, superuser)
        user_password: str | None = None
        if self._accept_kw("with", "password"):
            user_password = self._string()
        is_superuser: bool | None = None
        if self._accept_kw("superuser"):
            is_superuser = True
        elif self._accept_kw("nosuperuser"):
            is_superuser = False
        return CreateRole(name, if_not_exists, user_password, True, is_superuser)

    def _string(self) -> str:
        token = self._next()
        if token.kind is not TokenKind.STRING:
            self._fail("a string", token)
        return token.text

    def _boolean(self) -> bool:
        token = self._next()
        if token.kind is not TokenKind.IDENT or token.text not in ("true", "false"):
            self._fail("true or false", token)
        return token.text == "true"

    def _grant(self) -> Grant:
        revoke = self._next().text == "revoke"
        token = self._next()
        if token.kind is not TokenKind.IDENT or token.text not in _PERMISSIONS:
            self._fail("a permission", token)
        permission = token.text
        if permission == "all":
            self._accept_kw("permissions")
        else:
            self._accept_kw("permission")
        self._expect_kw("on")
        resource: tuple[str | None, ...]
        if self._accept_kw("all", "keyspaces"):
            resource = ("all keyspaces",)
        elif self._accept_kw("keyspace"):
            resource = ("keyspace", self._ident())
        else:
            self._accept_kw("table")
            ref = self._table_ref()
            resource = ("table", ref.keyspace, ref.name)
        self._expect_kw("from" if revoke else "to")
        return Grant(permission, resource, self._role_name(), revoke)

    # ----------------------------------------------------------------- terms

    def _term(self) -> Term:
        token = self._next()
        kind = token.kind
        if kind is TokenKind.STRING:
            return Constant("string", token.text)
        if kind is TokenKind.INTEGER:
            return Constant("integer", token.text)
        if kind is TokenKind.FLOAT:
            return Constant("float", token.text)
        if kind is TokenKind.UUID:
            return Constant("uuid", token.text)
        if kind is TokenKind.BLOB:
            return Constant("blob", token.text)
        if kind is TokenKind.IDENT:
            if token.text in ("true", "false"):
                return Constant("boolean", token.text)
            if token.text == "null":
                return Constant("null", token.text)
            if token.text in ("nan", "infinity"):
                return Constant("float", token.text)
            if self._accept_punct("("):
                return FunctionCall(token.text, tuple(self._comma_separated(self._term, ")")))
            self._fail("a value", token)
        if kind is TokenKind.PUNCT:
            text = token.text
            if text == "-":
                number = self._next()
                if number.kind in (TokenKind.INTEGER, TokenKind.FLOAT):
                    return Constant(
                        "integer" if number.kind is TokenKind.INTEGER else "float",
                        "-" + number.text,
                    )
                if number.kind is TokenKind.IDENT and number.text in ("nan", "infinity"):
                    return Constant("float", "-" + number.text)
                self._fail("a number", number)
            if text == "?":
                return self._marker(None)
            if text == ":":
                return self._marker(self._ident())
            if text == "[":
                return ListLiteral(tuple(self._comma_separated(self._term, "]")))
            if text == "(":
                return TupleLiteral(tuple(self._comma_separated(self._term, ")")))
            if text == "{":
                return self._brace_literal()
        self._fail(None, token)

    def _marker(self, name: str | None) -> BindMarker:
        marker = BindMarker(self._markers, name)
        self._markers += 1
        return marker

    def _brace_literal(self) -> Term:
        if self._accept_punct("}"):
            return MapLiteral(())
        first = self._term()
        if self._accept_punct(":"):
            pairs = [(first, self._term())]
            while self._accept_punct(","):
                key = self._term()
                self._expect_punct(":")
                pairs.append((key, self._term()))
            self._expect_punct("}")
            return MapLiteral(tuple(pairs))
        items = [first]
        while self._accept_punct(","):
            items.append(self._term())
        self._expect_punct("}")
        return SetLiteral(tuple(items))


def _constant_text(term: Term) -> str:
    if isinstance(term, Constant):
        return term.text
    raise CqlSyntaxError("expected a constant")


def _render_term(term: Term) -> str:
    """A table option's value as text; options are accepted and otherwise ignored."""
    if isinstance(term, Constant):
        return term.text
    if isinstance(term, MapLiteral):
        inner = ", ".join(f"{_render_term(k)}: {_render_term(v)}" for k, v in term.items)
        return "{" + inner + "}"
    return repr(term)

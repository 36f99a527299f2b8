"""What a CQL statement does, read from its text: enough to decide whether to coalesce it.

This is not a parser. It finds the statement's kind, the table it reads or writes,
whether it is conditional (a lightweight transaction) and whether a SELECT calls a
function whose answer changes from call to call (``now()``, ``uuid()``, ...). When in
doubt it says "not coalescable": a missed merge costs one read, a wrong merge serves
someone the wrong rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["StatementInfo", "classify"]

# Functions whose result differs between two identical statements.
_VOLATILE = frozenset(
    {
        "now",
        "uuid",
        "currenttimestamp",
        "currentdate",
        "currenttime",
        "currenttimeuuid",
        "random",
        "rand",
    }
)

_TOKEN = re.compile(
    r"""
    \s+ | --[^\n]* | //[^\n]* | /\*.*?\*/         # blanks and comments: skipped
    | (?P<string>'(?:[^']|'')*')                  # 'text' with '' escapes
    | (?P<dollar>\$\$.*?\$\$)                     # $$text$$
    | (?P<quoted>"(?:[^"]|"")*")                  # "Quoted Identifier"
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """The facts about one statement that coalescing decisions need.

    ``kind`` is the lower-cased first keyword family: ``select``, ``insert``,
    ``update``, ``delete``, ``batch``, ``use``, ``ddl`` (schema changes and TRUNCATE)
    or ``other``. ``keyspace`` is the explicit keyspace, None when unqualified.
    ``tables`` lists every (keyspace or None, table) written by a batch.
    """

    kind: str
    keyspace: str | None = None
    table: str | None = None
    conditional: bool = False
    volatile: bool = False
    tables: tuple[tuple[str | None, str], ...] = ()

    @property
    def coalescable(self) -> bool:
        """A plain SELECT of one table whose answer depends only on its text and values."""
        return self.kind == "select" and self.table is not None and not self.volatile

    @property
    def is_write(self) -> bool:
        """Changes data: later reads of what it touched must not reuse older answers."""
        return self.kind in ("insert", "update", "delete", "batch", "ddl")


def _tokens(query: str) -> list[str]:
    """Words lower-cased, quoted identifiers unquoted (case kept), strings as ``'``."""
    out = []
    for match in _TOKEN.finditer(query):
        kind = match.lastgroup
        if kind is None:
            continue
        text = match.group(kind)
        if kind == "word":
            out.append(text.lower())
        elif kind == "quoted":
            out.append('"' + text[1:-1].replace('""', '"'))
        elif kind in ("string", "dollar"):
            out.append("'")
        else:
            out.append(text)
    return out


def _name(token: str) -> str:
    return token[1:] if token.startswith('"') else token


def _table_at(tokens: list[str], i: int) -> tuple[str | None, str | None]:
    """Read ``ks.table`` or ``table`` starting at tokens[i]."""
    if i >= len(tokens) or not _is_identifier(tokens[i]):
        return None, None
    if i + 2 < len(tokens) and tokens[i + 1] == "." and _is_identifier(tokens[i + 2]):
        return _name(tokens[i]), _name(tokens[i + 2])
    return None, _name(tokens[i])


def _is_identifier(token: str) -> bool:
    return token.startswith('"') or token[:1].isalpha() or token[:1] == "_"


def _after(tokens: list[str], word: str, start: int = 0) -> int:
    try:
        return tokens.index(word, start) + 1
    except ValueError:
        return len(tokens)


def _has_condition(tokens: list[str], start: int) -> bool:
    """An ``IF`` clause (``IF EXISTS``, ``IF NOT EXISTS``, ``IF col = ...``) after start."""
    return "if" in tokens[start:]


@lru_cache(maxsize=4096)
def classify(query: str) -> StatementInfo:
    """Classify one CQL statement (cached: applications repeat their statements)."""
    tokens = _tokens(query)
    if not tokens:
        return StatementInfo("other")
    head = tokens[0]
    if head == "select":
        start = _after(tokens, "from")
        keyspace, table = _table_at(tokens, start)
        volatile = any(
            tok in _VOLATILE and i + 1 < len(tokens) and tokens[i + 1] == "("
            for i, tok in enumerate(tokens)
        )
        return StatementInfo("select", keyspace, table, volatile=volatile)
    if head == "insert":
        start = _after(tokens, "into")
        keyspace, table = _table_at(tokens, start)
        return StatementInfo("insert", keyspace, table, conditional=_has_condition(tokens, start))
    if head == "update":
        keyspace, table = _table_at(tokens, 1)
        return StatementInfo("update", keyspace, table, conditional=_has_condition(tokens, 1))
    if head == "delete":
        start = _after(tokens, "from")
        keyspace, table = _table_at(tokens, start)
        return StatementInfo("delete", keyspace, table, conditional=_has_condition(tokens, start))
    if head == "begin":
        written = []
        for i, tok in enumerate(tokens):
            if tok in ("into", "update") or (tok == "from" and "delete" in tokens[:i]):
                ks, table = _table_at(tokens, i + 1)
                if table is not None:
                    written.append((ks, table))
        return StatementInfo(
            "batch", conditional=_has_condition(tokens, 1), tables=tuple(dict.fromkeys(written))
        )
    if head == "use" and len(tokens) > 1:
        return StatementInfo("use", keyspace=_name(tokens[1]))
    if head == "truncate":
        i = 2 if len(tokens) > 1 and tokens[1] == "table" else 1
        keyspace, table = _table_at(tokens, i)
        return StatementInfo("ddl", keyspace, table)
    if head in ("create", "alter", "drop"):
        keyspace, table = None, None
        if len(tokens) > 1 and tokens[1] in ("table", "columnfamily"):
            i = 2
            if tokens[i : i + 3] == ["if", "not", "exists"]:
                i += 3
            elif tokens[i : i + 2] == ["if", "exists"]:
                i += 2
            keyspace, table = _table_at(tokens, i)
        return StatementInfo("ddl", keyspace, table)
    return StatementInfo("other")

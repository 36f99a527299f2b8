"""Tokenizer for the CQL subset the emulator understands.

`tokenize(text)` turns a statement into a list of `Token` ending with an
``EOF`` token. It is pure and total: any input either tokenizes or raises
`CqlSyntaxError` (never another exception), so the server can always answer
with a SYNTAX_ERROR instead of dropping the connection.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from coalesce.emulator.errors import CqlSyntaxError

__all__ = ["Token", "TokenKind", "tokenize"]


class TokenKind(enum.Enum):
    """What a token is; keywords are plain `IDENT` tokens, compared by text."""

    IDENT = "identifier"
    QUOTED_IDENT = "quoted identifier"
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    UUID = "uuid"
    BLOB = "blob"
    DURATION = "duration"
    PUNCT = "punctuation"
    EOF = "end of input"


@dataclass(frozen=True, slots=True)
class Token:
    """One lexical token.

    `text` is the token's value: lowercased for unquoted identifiers (CQL is
    case-insensitive there), unescaped for strings and quoted identifiers,
    verbatim otherwise. `pos` is the 0-based offset into the source text.
    """

    kind: TokenKind
    text: str
    pos: int


_PATTERNS: list[tuple[TokenKind | None, str]] = [
    (None, r"\s+|--[^\n]*|//[^\n]*|/\*.*?\*/"),
    (
        TokenKind.UUID,
        r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
        r"(?![0-9a-zA-Z_])",
    ),
    (TokenKind.BLOB, r"0[xX][0-9a-fA-F]*(?![0-9a-zA-Z_])"),
    # CQL's unit form of a duration literal (`2000ms`, `1h30m`): Scylla's `USING TIMEOUT`.
    (
        TokenKind.DURATION,
        r"(?i:(?:\d+(?:mo|ms|us|µs|ns|y|w|d|h|m|s))+)(?![0-9a-zA-Z_])",
    ),
    (TokenKind.FLOAT, r"(?:\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)(?![0-9a-zA-Z_])"),
    (TokenKind.INTEGER, r"\d+(?![0-9a-zA-Z_])"),
    (TokenKind.IDENT, r"[a-zA-Z][a-zA-Z0-9_]*"),
    (TokenKind.PUNCT, r"<=|>=|!=|[(),;.*=<>{}\[\]:?+\-]"),
]
_MASTER = re.compile(
    "|".join(f"(?P<g{i}>{pattern})" for i, (_, pattern) in enumerate(_PATTERNS)),
    re.DOTALL,
)


def _line_col(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1)
    return f"line {line}:{col}"


def _read_quoted(text: str, pos: int, quote: str) -> tuple[str, int]:
    """Read a quote-delimited run where a doubled quote escapes itself."""
    out: list[str] = []
    i = pos + 1
    while True:
        end = text.find(quote, i)
        if end < 0:
            raise CqlSyntaxError(f"{_line_col(text, pos)} unterminated {quote}-quoted text")
        out.append(text[i:end])
        if text.startswith(quote, end + 1):
            out.append(quote)
            i = end + 2
            continue
        return "".join(out), end + 1


def tokenize(text: str) -> list[Token]:
    """Split `text` into tokens; raises `CqlSyntaxError` on a character CQL can't start with."""
    tokens: list[Token] = []
    pos = 0
    length = len(text)
    while pos < length:
        char = text[pos]
        if char == "'":
            value, pos_after = _read_quoted(text, pos, "'")
            tokens.append(Token(TokenKind.STRING, value, pos))
            pos = pos_after
            continue
        if char == '"':
            value, pos_after = _read_quoted(text, pos, '"')
            if not value:
                raise CqlSyntaxError(f"{_line_col(text, pos)} empty quoted identifier")
            tokens.append(Token(TokenKind.QUOTED_IDENT, value, pos))
            pos = pos_after
            continue
        if text.startswith("$$", pos):
            end = text.find("$$", pos + 2)
            if end < 0:
                raise CqlSyntaxError(f"{_line_col(text, pos)} unterminated $$-quoted text")
            tokens.append(Token(TokenKind.STRING, text[pos + 2 : end], pos))
            pos = end + 2
            continue
        match = _MASTER.match(text, pos)
        if match is None:
            raise CqlSyntaxError(
                f"{_line_col(text, pos)} no viable alternative at character {char!r}"
            )
        group = match.lastgroup
        assert group is not None
        kind = _PATTERNS[int(group[1:])][0]
        if kind is not None:
            value = match.group()
            if kind is TokenKind.IDENT:
                value = value.lower()
            tokens.append(Token(kind, value, pos))
        pos = match.end()
    tokens.append(Token(TokenKind.EOF, "", length))
    return tokens

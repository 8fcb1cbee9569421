"""Identifier validation, quoting and the generated SQL.

Identifiers are validated, then double-quoted as written (so they are case-sensitive, as in
``asyncpg.Connection.copy_to_table``); values only ever travel as bound parameters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ._errors import ConfigError

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}\Z")
_ORDER_TERM = re.compile(
    r"\s*(?P<col>[A-Za-z_][A-Za-z0-9_$]{0,62})(?:\s+(?P<dir>ASC|DESC))?(?:\s+NULLS\s+(?P<nulls>FIRST|LAST))?\s*\Z",
    re.IGNORECASE,
)


def _bad(dataset: str, what: str, value: object, fix: str) -> ConfigError:
    return ConfigError(f"dataset {dataset!r}: {what}={value!r} is not valid: {fix}")


def quote_ident(dataset: str, what: str, name: str) -> str:
    if not isinstance(name, str) or not _IDENT.match(name):
        raise _bad(
            dataset, what, name,
            "use a plain SQL identifier (letters, digits, _ or $, not starting with a digit, at most 63 characters); "
            "for expressions, joins or views pass warm_query= and lookup_query=",
        )
    return '"' + name + '"'


def quote_table(dataset: str, table: str) -> str:
    parts = table.split(".") if isinstance(table, str) else [table]
    if len(parts) > 2:
        raise _bad(dataset, "table", table, "use name or schema.name")
    return ".".join(quote_ident(dataset, "table", part) for part in parts)


def order_clause(dataset: str, order_by: str) -> str:
    terms = []
    for raw in order_by.split(","):
        match = _ORDER_TERM.match(raw)
        if match is None:
            raise _bad(
                dataset, "order_by", order_by,
                "use 'column [ASC|DESC] [NULLS FIRST|LAST]', comma separated; for anything else pass warm_query=",
            )
        term = quote_ident(dataset, "order_by", match["col"])
        if match["dir"]:
            term += " " + match["dir"].upper()
        if match["nulls"]:
            term += " NULLS " + match["nulls"].upper()
        terms.append(term)
    return ", ".join(terms)


def select_list(dataset: str, key: str, columns: Sequence[str] | None) -> str:
    if columns is None:
        return "*"
    if isinstance(columns, str):
        raise _bad(dataset, "columns", columns, "pass a list of column names, not one string")
    names = list(dict.fromkeys(columns))
    if key not in names:
        names.insert(0, key)
    return ", ".join(quote_ident(dataset, "columns", c) for c in names)


def warm_sql(table: str, select: str, order: str | None) -> str:
    order_part = f" ORDER BY {order}" if order else ""
    return f"SELECT {select} FROM {table}{order_part} LIMIT $1"


def lookup_sql(table: str, select: str, key: str) -> str:
    return f"SELECT {select} FROM {table} WHERE {key} = ANY($1)"

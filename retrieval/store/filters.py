"""Filters over a collection's columns, as LanceDB takes them: string literals, ``IN`` lists (in chunks of
:data:`IN_LIST`), a shell glob as ``LIKE``, and a bad filter's error said as the user's mistake. Plain strings:
imports no LanceDB (:mod:`clipdex.retrieval.store.record` runs the queries)."""

from __future__ import annotations

from collections.abc import Iterator

from clipdex.exceptions import StoreError
from clipdex.retrieval.store.schema import FILTER_COLUMNS

IN_LIST = 500  # values per SQL ``IN (...)`` list: queries by many ids go in chunks of this size


def sql_quote(value: str) -> str:
    """A string literal for a LanceDB filter."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_in(column: str, values) -> str:
    """``column IN ('a', 'b')``."""
    return f"{column} IN ({', '.join(sql_quote(v) for v in values)})"


def glob_to_like(pattern: str) -> str:
    """A shell glob on file paths as a SQL LIKE pattern; a relative glob matches at any depth."""
    out = []
    for ch in pattern:
        out.append({"*": "%", "?": "_", "%": "\\%", "_": "\\_", "\\": "\\\\", "'": "''"}.get(ch, ch))
    like = "".join(out)
    return like if pattern.startswith(("/", "*")) else "%/" + like


def chunks(items: list, size: int) -> Iterator[list]:
    """``items`` in lists of at most ``size``."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _is_io_error(e: Exception) -> bool:
    """Whether LanceDB's error is about reading files (damage), not about the query."""
    text = str(e)
    return isinstance(e, OSError) or "LanceError(IO)" in text or "Not found:" in text or "Io {" in text


def filter_errors(where: str | None, run):
    """``run()``, with LanceDB's report of a bad ``where`` (one of several error types) as a StoreError;
    a failure to read the files is not the filter's fault and is raised as it is."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - LanceDB reports a bad filter as one of several error types
        if not where or _is_io_error(e):
            raise
        raise StoreError(f"bad filter {where!r}: {e}. Columns you can filter on: {', '.join(FILTER_COLUMNS)}") from e


__all__ = ["IN_LIST", "chunks", "filter_errors", "glob_to_like", "sql_in", "sql_quote"]

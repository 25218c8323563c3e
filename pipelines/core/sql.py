"""SQL text for Delta predicates: every string value goes through ``literal``."""

from __future__ import annotations


def literal(value: str) -> str:
    """``value`` as a SQL string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def all_of(*predicates: str | None) -> str | None:
    """The conjunction of the given predicates (``None`` ones left out), each parenthesised."""
    given = [f"({p})" for p in predicates if p]
    return " AND ".join(given) if given else None

"""Named, versioned sets of pairs with the label they are trained with.

A set is the rows of ``curated_sets`` with its ``set_name``; writing a set makes the table hold
exactly its new members (changed rows rewritten, the rest deleted), so ``NAME@VERSION`` (the
table's Delta version after the write) names the set as it was then. Training reads a set
(``training.data.set``) and swaps chosen and rejected of its ``flipped`` pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.errors import SelectionError
from pipelines.core.lake import Lake
from pipelines.core.sql import literal
from storage_schemas import CURATED_SETS

SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$")


@dataclass(frozen=True)
class SetRef:
    """A set by name, at a Delta version of ``curated_sets`` (``None``: the latest)."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> SetRef:
        """``NAME`` or ``NAME@VERSION``."""
        name, _, version = text.partition("@")
        if not SET_NAME.match(name) or (version and not version.isdigit()):
            raise SelectionError(f"{text!r} is not a set name (NAME or NAME@VERSION)")
        return cls(name, int(version) if version else None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def write_set(lake: Lake, name: str, members: pa.Table) -> SetRef:
    """Make set ``name`` hold exactly ``members`` (source, pair_id, flipped, origin, event_id);
    returns the set at the version that holds it (unchanged members: no new commit)."""
    if not SET_NAME.match(name):
        raise SelectionError(f"{name!r} is not a set name (letters, digits, _ . - /)")
    rows = members.append_column("set_name", pa.array([name] * members.num_rows, pa.string()))
    result = lake.replace_decisions(
        CURATED_SETS,
        rows.select(CURATED_SETS.schema.names),
        ("flipped", "origin", "event_id"),
        scope=f"t.set_name = {literal(name)}",
    )
    return SetRef(name, result.version)


def read_set(lake: Lake, ref: SetRef) -> pa.Table:
    """The members of a set (source, pair_id, flipped, origin, event_id); an unknown or empty
    set is a ``SelectionError``."""
    if not lake.exists(CURATED_SETS.name):
        raise SelectionError(f"set {ref}: no curated set exists yet (run `synpref loop run`)")
    members = lake.read(CURATED_SETS.name, ref.version, where=f"set_name = {literal(ref.name)}")
    if members.num_rows == 0:
        raise SelectionError(f"set {ref} has no pairs (or does not exist)")
    members = members.drop_columns(["set_name"])
    return members.sort_by([("source", "ascending"), ("pair_id", "ascending")])


def pinned(lake: Lake, ref: SetRef) -> SetRef:
    """``ref`` at a fixed version (the latest when it has none)."""
    return ref if ref.version is not None else SetRef(ref.name, lake.version(CURATED_SETS.name))


def flipped_keys(members: pa.Table) -> pa.Table:
    """(source, pair_id) of the members trained with chosen and rejected swapped."""
    flipped = members.filter(pc.field("flipped"))
    return pa.table({"source": flipped["source"], "pair_id": flipped["pair_id"]})

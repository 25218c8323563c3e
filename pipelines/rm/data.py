"""The training set of a reward model: a versioned selection of lake pairs, tokenised on Ray Data.

``training_selection`` resolves the configured selection (SQL over a lake table at a pinned Delta
version, optionally only pairs whose curation status is ``kept``) into the keys of the training
and validation pairs. ``tokenized_pairs`` reads those rows with Ray Data and tokenises them on an
actor pool with the same formatting as scoring and serving (``format_conversation``), applying the
truncation policy: ``left`` keeps the last ``max_length`` tokens (the response being judged),
``drop`` marks the pair dropped. A selection from curated sets (``training.data.set``) trains each
pair with the label the set holds: its ``flipped`` pairs swap chosen and rejected as they are
tokenised. Every row carries ``row_key``, a 64-bit hash of (source, pair_id),
which checkpoints record so that a resumed run never trains a pair twice in an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import xxhash
from deltalake.exceptions import DeltaError
from ray.data.dataset import MaterializedDataset

from pipelines.core.actor_pool import in_blocks_of
from pipelines.core.config import TrainingConfig, TrainingDataConfig
from pipelines.core.errors import SelectionError
from pipelines.core.lake import Lake
from pipelines.labels.sets import SetRef, flipped_keys, pinned, read_set
from pipelines.rm.model import encode, format_conversation, load_tokenizer, pair_conversations
from storage_schemas import CURATION_STATUS, PAIRS

KEYS = ["source", "pair_id"]
TEXT_COLUMNS = ["history", "chosen", "rejected"]
TOKENIZED = pa.schema(
    [
        pa.field("row_key", pa.int64()),
        pa.field("chosen_ids", pa.list_(pa.int32())),
        pa.field("rejected_ids", pa.list_(pa.int32())),
        pa.field("length", pa.int32()),
        pa.field("truncated", pa.bool_()),
        pa.field("dropped", pa.bool_()),
        pa.field("weight", pa.float32()),
        pa.field("margin", pa.float32()),
    ]
)
"""One tokenised pair; ``length`` is the longer side's tokens (what a micro-batch pads to)."""
DATA_CPUS = 0.25
"""CPUs per read task and tokenizer actor: training workers hold the rest (Ray Data hangs when
no CPU is left for its reads)."""
TOKENIZE_BATCH = 256
"""Pairs per tokenizer call."""
TOKENIZE_ON_DRIVER = 2048
"""Sets up to this many pairs are tokenised by the driver (a second or two of work): an actor
would be a process importing transformers, and each set a streaming split with its own
coordinator actor, seconds of start-up per training run on a small machine for a loop's gold
and training sets."""


@dataclass(frozen=True)
class TrainingSelection:
    """The keys (source, pair_id) of the training and validation pairs at one table version."""

    table: str
    version: int
    train: pa.Table
    validation: pa.Table
    flipped: pa.Table
    """Keys of the pairs trained with chosen and rejected swapped (from curated sets)."""
    sets: tuple[SetRef, ...] = ()
    """The curated sets read, at their pinned versions."""


def row_keys(source: pa.Array | pa.ChunkedArray, pair_id: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """int64 identity of each (source, pair_id): the same content may appear in two sources."""
    return np.array(
        [
            xxhash.xxh3_64_intdigest(f"{s}\0{p}".encode())
            for s, p in zip(source.to_pylist(), pair_id.to_pylist(), strict=True)
        ],
        np.uint64,
    ).view(np.int64)


def training_selection(lake: Lake, data: TrainingDataConfig) -> TrainingSelection:
    """Resolve the configured selection (a bad table, column or predicate: ``SelectionError``)."""
    if not lake.exists(data.table):
        raise SelectionError(f"training.data.table {data.table!r} does not exist in the lake")
    version = lake.version(data.table) if data.version is None else data.version
    selected = _read_keys(lake, data.table, version, data.where, "training.data.where")
    sets: list[SetRef] = []
    # Each pair is labelled as the set it trains or validates from holds it.
    train_flips = validation_flips = pa.table({k: pa.array([], pa.string()) for k in KEYS})
    if data.set is not None or data.validation_set is not None:
        if data.table != PAIRS.name:
            raise SelectionError(
                "training.data.set selects pairs: training.data.table must be pairs"
            )
        if data.validation_set is not None and data.validation_where is not None:
            raise SelectionError("give validation_set or validation_where, not both")
    if data.set is not None:
        members, ref = _set_members(lake, data.set)
        selected = selected.join(members.select(KEYS), KEYS, join_type="inner")
        sets.append(ref)
        train_flips = validation_flips = flipped_keys(members)
    if data.curated_only:
        if not lake.exists(CURATION_STATUS.name):
            raise SelectionError(
                "training.data.curated_only needs the curation_status table: run `synpref dedup`"
            )
        kept = lake.read(CURATION_STATUS.name, columns=KEYS, where="status = 'kept'")
        selected = selected.join(kept, KEYS, join_type="inner")
    if data.validation_set is not None:
        members, ref = _set_members(lake, data.validation_set)
        validation = _read_keys(lake, data.table, version, None, "").join(
            members.select(KEYS), KEYS, join_type="inner"
        )
        sets.append(ref)
        validation_flips = flipped_keys(members)
        train = selected.join(validation, KEYS, join_type="left anti")
    elif data.validation_where is not None:
        validation = _read_keys(
            lake, data.table, version, data.validation_where, "training.data.validation_where"
        )
        train = selected.join(validation, KEYS, join_type="left anti")
    else:
        held_out = _held_out(selected, data.validation_fraction)
        validation, train = selected.filter(held_out), selected.filter(pc.invert(held_out))
    if train.num_rows == 0:
        scope = ", ".join([f"where {data.where!r}", *(f"set {ref}" for ref in sets)])
        # A selection inside its validation set (a loop's curated set of gold pairs only) is
        # emptied by the hold-out, not by the predicate: say so.
        held_out = selected.num_rows and f": all {selected.num_rows:,} selected pairs validate"
        raise SelectionError(
            f"the training selection is empty ({data.table} v{version}, {scope}){held_out or ''}"
        )
    return TrainingSelection(
        data.table,
        version,
        _sorted(train),
        _sorted(validation),
        pa.concat_tables(
            [
                train_flips.join(train, KEYS, join_type="inner"),
                validation_flips.join(validation, KEYS, join_type="inner"),
            ]
        ),
        tuple(sets),
    )


def _set_members(lake: Lake, text: str) -> tuple[pa.Table, SetRef]:
    ref = pinned(lake, SetRef.parse(text))
    return read_set(lake, ref), ref


def _read_keys(lake: Lake, table: str, version: int, where: str | None, option: str) -> pa.Table:
    if where:
        try:
            lake.check_predicate(table, where, version)
        except SelectionError as exc:
            raise SelectionError(f"{option}: {exc}") from None
    try:
        keys = lake.read(table, version, KEYS, where)
    except DeltaError as exc:
        message = f"{option} {where!r} is not a SQL predicate on {table}: {exc}"
        raise SelectionError(message) from None
    if keys.num_rows != len(set(zip(*(keys[k].to_pylist() for k in KEYS), strict=True))):
        raise SelectionError(f"{table} has repeated (source, pair_id) keys: not a pair table")
    return keys


def _held_out(keys: pa.Table, fraction: float) -> pa.Array:
    """A deterministic fraction of pairs, by hash: the same pairs whatever the row order."""
    hashes = row_keys(keys["source"], keys["pair_id"]).view(np.uint64)
    return pa.array(hashes < np.uint64(fraction * 2.0**64))


def _sorted(keys: pa.Table) -> pa.Table:
    return keys.sort_by([(k, "ascending") for k in KEYS])


class PairTokenizer:
    """Ray Data actor: formats and tokenises pairs (tokenizer loaded once per actor)."""

    def __init__(self, training: TrainingConfig, flipped: np.ndarray) -> None:
        self.tokenizer = load_tokenizer(training.backbone, **training.backbone_kwargs)
        self.flipped = flipped
        self.max_length = training.max_length
        self.drop = training.truncation == "drop"
        self.weight_column = training.data.weight_column
        self.margin_column = training.data.margin_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        keys = row_keys(batch["source"], batch["pair_id"])
        swap = np.isin(keys, self.flipped)
        chosen, rejected = batch["chosen"].to_pylist(), batch["rejected"].to_pylist()
        chosen, rejected = (
            [r if s else c for c, r, s in zip(chosen, rejected, swap, strict=True)],
            [c if s else r for c, r, s in zip(chosen, rejected, swap, strict=True)],
        )
        conversations = pair_conversations(batch["history"].to_pylist(), chosen, rejected)
        texts = [format_conversation(self.tokenizer, c) for c in conversations]
        ids, full = encode(self.tokenizer, texts, self.max_length)
        over = (full[:n] > self.max_length) | (full[n:] > self.max_length)
        dropped = over if self.drop else np.zeros(n, bool)
        cut = [[] if dropped[i % n] else i_ids for i, i_ids in enumerate(ids)]
        length = np.maximum([len(c) for c in cut[:n]], [len(c) for c in cut[n:]])
        return pa.table(
            {
                "row_key": keys,
                "chosen_ids": pa.array(cut[:n], pa.list_(pa.int32())),
                "rejected_ids": pa.array(cut[n:], pa.list_(pa.int32())),
                "length": pa.array(length, pa.int32()),
                "truncated": pa.array(over & ~dropped),
                "dropped": pa.array(dropped),
                "weight": self._column(batch, self.weight_column, 1.0),
                "margin": self._column(batch, self.margin_column, 0.0),
            },
            schema=TOKENIZED,
        )

    @staticmethod
    def _column(batch: pa.Table, name: str | None, default: float) -> pa.Array:
        if name is None:
            return pa.array(np.full(batch.num_rows, default, np.float32))
        return batch[name].cast(pa.float32()).combine_chunks()  # checked by _check_values


def tokenized_pairs(
    lake: Lake,
    selection: TrainingSelection,
    keys: pa.Table,
    training: TrainingConfig,
    block_rows: int | None = None,
) -> ray.data.Dataset:
    """The pairs ``keys`` of the selection as a Ray Dataset of ``TOKENIZED`` rows, in blocks of
    exactly ``block_rows`` rows but the last (a training worker's share of a step)."""
    extra = [c for c in (training.data.weight_column, training.data.margin_column) if c]
    schema = lake.table_schema(selection.table, selection.version)
    missing = [c for c in [*KEYS, *TEXT_COLUMNS, *extra] if c not in schema.names]
    if missing:
        raise SelectionError(f"training table {selection.table} has no column(s) {missing}")
    _check_values(lake, selection, keys, training.data, schema)
    columns = [*KEYS, *TEXT_COLUMNS, *extra]
    rows = lake.dataset(selection.table, selection.version, columns, keys=keys, read_cpus=DATA_CPUS)
    flipped = row_keys(selection.flipped["source"], selection.flipped["pair_id"])
    if keys.num_rows <= TOKENIZE_ON_DRIVER:
        return _tokenized_here(rows, PairTokenizer(training, flipped), block_rows)
    # An actor per batch at most: each one is a process importing transformers (seconds).
    actors = max(1, min(training.workers, -(-keys.num_rows // TOKENIZE_BATCH)))
    options: dict[str, Any] = {
        "batch_format": "pyarrow",
        "batch_size": TOKENIZE_BATCH,
        "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        "num_cpus": DATA_CPUS,
    }
    tokenized = rows.map_batches(PairTokenizer, fn_constructor_args=(training, flipped), **options)
    return tokenized if block_rows is None else in_blocks_of(tokenized, block_rows, DATA_CPUS)


def _check_values(
    lake: Lake,
    selection: TrainingSelection,
    keys: pa.Table,
    data: TrainingDataConfig,
    schema: pa.Schema,
) -> None:
    """The selected pairs' weights are numbers of at least 0 and their margins numbers: a null,
    NaN or negative one is refused here, before a worker starts, not in the middle of a run (a
    negative weight would train the pair the wrong way round)."""
    for option, negative_allowed in (("weight_column", False), ("margin_column", True)):
        column = getattr(data, option)
        if column is None:
            continue
        kind = schema.field(column).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise SelectionError(f"training.data.{option} {column!r} is {kind}, not a number")
        bad = {"null": f'"{column}" IS NULL'}
        if pa.types.is_floating(kind):
            bad["NaN"] = f'isnan("{column}")'
        if not negative_allowed:
            bad["negative"] = f'"{column}" < 0'
        rows = lake.read(selection.table, selection.version, KEYS, " OR ".join(bad.values()))
        rows = rows.join(keys.select(KEYS), KEYS, join_type="inner")
        if rows.num_rows:
            raise SelectionError(
                f"training.data.{option} {column!r}: {rows.num_rows:,} selected pair(s) of "
                f"{selection.table} v{selection.version} are {' or '.join(bad)} there (e.g. "
                f"{rows['source'][0]}/{rows['pair_id'][0]})"
            )


def _tokenized_here(
    rows: ray.data.Dataset, tokenize: PairTokenizer, block_rows: int | None
) -> MaterializedDataset:
    """A small set read by Ray Data, tokenised by the driver in key order (the order blocks
    arrive in varies from run to run) and cut into blocks: the same blocks in every run.

    ``from_blocks`` keeps the blocks as cut and reads their metadata here; ``from_arrow`` ran a
    task per block for it (2 s of a small training's start-up on 2 cores, measured)."""
    parts = [t for t in ray.get(rows.to_arrow_refs()) if t.num_rows]
    tokenized = tokenize(pa.concat_tables(parts).sort_by([(k, "ascending") for k in KEYS]))
    size = block_rows or TOKENIZE_BATCH
    return ray.data.from_blocks(
        [tokenized.slice(at, size) for at in range(0, tokenized.num_rows, size)]
    )

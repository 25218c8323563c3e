"""Who verifies pairs for the loop: people in Label Studio, or a simulated annotator.

``label-studio`` pushes the pairs as tasks (``pipelines.labels.review``) and the loop waits until
``synpref review pull`` has brought their answers in as label events. ``simulated`` answers at
once from the corpus's ground truth (``loop.simulated_flips`` marks the pairs whose stored label
is wrong) as the annotator ``simulated``: demos and tests, never a claim of human review.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipelines.core.config import SynprefConfig
from pipelines.core.lake import Lake
from pipelines.core.selection import select_pair_keys
from pipelines.core.sql import literal
from pipelines.labels.events import LabelEvent, live_events, record_events
from pipelines.loop.pools import KEYS
from storage_schemas import PAIRS

SIMULATED = "simulated"


def request_review(
    config: SynprefConfig,
    lake: Lake,
    keys: pa.Table,
    iteration: int,
    step: str,
    run_id: str,
    pairs_version: int,
) -> dict[str, Any]:
    """Send ``keys`` to the configured annotator; the result names where they went."""
    loop = config.loop
    if loop.annotator == SIMULATED:
        flips = select_pair_keys(lake, pairs_version, loop.simulated_flips or "FALSE")
        wrong = set(zip(flips["source"].to_pylist(), flips["pair_id"].to_pylist(), strict=True))
        events = [
            LabelEvent(
                source,
                pair_id,
                "flip" if (source, pair_id) in wrong else "keep",
                "human",
                SIMULATED,
                f"{loop.name}/{step}",
                loop=loop.name,
                iteration=iteration,
                step=step,
                confidence=1.0,
                evidence={"simulated": True, "truth": loop.simulated_flips},
                read_versions={PAIRS.name: pairs_version},
            )
            for source, pair_id in zip(
                keys["source"].to_pylist(), keys["pair_id"].to_pylist(), strict=True
            )
        ]
        written = record_events(lake, events, run_id)
        return {"annotator": SIMULATED, "sent": keys.num_rows, "events_version": written.version}
    from pipelines.labels.review import push_pairs

    pushed = push_pairs(lake, config.review, keys, run_id, loop.name, iteration)
    return {"annotator": loop.annotator, "sent": keys.num_rows} | pushed.as_dict()


def awaited(lake: Lake, loop: str, keys: pa.Table) -> pa.Table:
    """The pairs of ``keys`` that no person of loop ``loop`` has answered yet."""
    answered = live_events(lake, where=f"origin = 'human' AND loop = {literal(loop)}")
    return keys.select(KEYS).join(answered.select(KEYS), KEYS, join_type="left anti")

"""atheris fuzz target for ingest's reading and normalisation: any bytes, as a `.jsonl`,
`.jsonl.gz` or `.json` file read in any record layout, must read and normalise without
raising, each record a pair or a quarantine row with a known reason and a detail (the
properties of test_ingest_generated.py, from coverage-guided bytes instead of a strategy).

    python -m tests.fuzz_records -atheris_runs=10000            # what the suite runs
    python -m tests.fuzz_records -max_total_time=3600 CORPUS/  # on demand; keeps finds in CORPUS/

A crash is written as ``crash-*`` (``-artifact_prefix=DIR/`` to choose where); replay it with
``python -m tests.fuzz_records crash-...`` and keep it as a case in test_ingest_generated.py.
"""

from __future__ import annotations

import gzip
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["pipelines.ingest"]):  # not Ray, Arrow, ...
    from pipelines.ingest.formats import FORMATS
    from tests.test_ingest_generated import assert_accounted, staged

SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
LAYOUTS = [f for f in FORMATS if f != "mapping"]  # a mapping needs its field paths
FOLDER = Path(tempfile.mkdtemp(prefix="synpref-fuzz-"))


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    suffix = provider.PickValueInList(list(SUFFIXES))
    layout = provider.PickValueInList(LAYOUTS)
    body = provider.ConsumeBytes(provider.remaining_bytes())
    path = FOLDER / f"records{suffix}"
    path.write_bytes(gzip.compress(body) if suffix.endswith(".gz") else body)
    assert_accounted(*staged(path, layout))


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()

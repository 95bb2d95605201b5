"""Property: any sequence of appends (retried, repeated event ids), exports and restarts equals a model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import make_event
from hypothesis import given, settings
from hypothesis import strategies as st

from insession.log.eventlog import EventLog
from insession.log.export import events_to_arrow
from insession.schema import Event

# an op is a batch of optional event ids drawn from a small alphabet (so retries collide), an export
# of the history, or a restart
batches = st.lists(st.one_of(st.none(), st.sampled_from("abcdefgh")), min_size=1, max_size=6)
ops = st.lists(st.one_of(batches, st.just("export"), st.just("reopen")), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(ops=ops)
def test_log_matches_model(ops: list[list[str | None] | str]) -> None:
    model_ids: dict[str, int] = {}  # event_id -> offset
    model: list[Event] = []  # what the log must hold, by offset
    committed: list[list[int]] = []
    marker = 0
    with tempfile.TemporaryDirectory() as tmp:
        path, history = Path(tmp) / "log.sqlite", Path(tmp) / "history"

        def opened() -> EventLog:
            return EventLog(path, on_commit=lambda evs: committed.append([e.offset for e in evs]))

        log = opened()
        try:
            for op in ops:
                if op == "reopen":
                    log.close()
                    log = opened()
                    continue
                if op == "export":
                    assert log.export(history) == len(model) - 1
                    continue
                events = []
                expected = []
                for eid in op:
                    events.append(make_event(marker, eid))
                    if eid is not None and eid in model_ids:
                        expected.append((model_ids[eid], True))
                    else:
                        if eid is not None:
                            model_ids[eid] = len(model)
                        expected.append((len(model), False))
                        model.append(make_event(marker, eid))
                        model[-1].offset = len(model) - 1
                    marker += 1
                results = log.append(events)
                assert [(r.offset, r.duplicate) for r in results] == expected
                assert log.last_offset() == len(model) - 1
            assert list(log.read()) == model
            files = sorted(history.glob("day=*/part-*.parquet"))
            exported = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
            parts = [t for t in (exported, log.tail_arrow(log.exported_offset() + 1)) if t is not None]
            assert pa.concat_tables(parts).sort_by("offset").equals(events_to_arrow(model))
            assert [off for c in committed for off in c] == list(range(len(model)))
            assert log.count() == len(model)
        finally:
            log.close()

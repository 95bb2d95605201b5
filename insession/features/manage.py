"""Zero-code features: declare, backfill, serve and retire a feature while the server runs.

`FeatureManager` carries out the feature statements of the query interface (`CREATE FEATURE ... AS
SELECT ...`, `DROP FEATURE`, `SHOW FEATURES`, `DESCRIBE FEATURE`) against a running `FeatureEngine`:

- **Declarations are durable and versioned.** `registry.json` (beside the snapshots) holds every declared
  feature, served or still backfilling; `registry-changes.jsonl` records every change: version, time,
  who (the API key's name), what (the statement) and the declaration's hash; appended and fsynced before
  the statement answers.
- **Backfill while serving.** A new feature is not served until it is whole. A child process replays the
  Parquet history into a one-feature engine (`backfill.py`: its own GIL, so serving keeps its CPU); the
  server restores that state, catches up from the log outside any lock (at most a quarter of a core,
  `CATCH_UP_DUTY`) until fewer than `INSTALL_GAP` events remain, then `FeatureEngine.install` applies
  those under the writer lock and the feature is served from the next read on. Until then its queries go
  to the analytics lane (the matcher sees only served features) and DESCRIBE shows the phase and
  progress. Then a snapshot is taken, so a restart serves it at once.
- **Restart in the middle restarts the backfill.** A declared feature the snapshot does not hold is left
  out of the engine at open (`FeatureEngine.unbuilt`); the manager backfills it again from the start.
  Nothing half-built is ever served.
- **A model pins only what it reads** (`declare.MODEL_FEATURES`): DROP of one of those is refused while a
  model serves, with the model's version named; any other feature comes and goes freely.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from insession.features.backfill import JOB_FILE, PROGRESS_FILE, Job, Progress
from insession.features.declare import DAY_MS, MODEL_FEATURES, Feature, FeatureRegistry
from insession.features.engine import REGISTRY_FILE, FeatureEngine, chunked
from insession.features.sql import FeatureSQLError, FeatureStatement, name_position, to_sql
from insession.schema import Event

log = logging.getLogger(__name__)

CHANGES_FILE = "registry-changes.jsonl"
BACKFILL_DIR = "backfill"
INSTALL_GAP = 2_000  # events left to apply under the writer lock when a backfill is installed
CATCH_UP_CHUNK = 2_000
# The catch-up from the log runs in the server's process: after each chunk it sleeps three times as long as
# the chunk took, so it takes at most a quarter of a core from serving (one feature replays at tens of
# thousands of events/s, so a quarter still outruns any ingest rate the server itself sustains).
CATCH_UP_DUTY = 0.25
# Windows longer than this are refused: insession keeps the whole log and history (no retention), but a
# window of years makes every read of the feature cover years of tiles; a year is the longest served.
MAX_WINDOW_MS = 366 * DAY_MS

ReadLog = Callable[[int, int], Iterable[Event]]  # (from_offset, upto) -> the log's events in between


class FeatureStatementError(FeatureSQLError):
    """A feature statement refused for what it asks (400), or for a conflict with the state (409)."""

    def __init__(self, message: str, status: int = 400, *, code: str = "invalid_feature",
                 position: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.line, self.col = (position or {}).get("line"), (position or {}).get("col")


@dataclass
class _Backfill:
    feature: Feature
    started: float = field(default_factory=time.time)
    phase: str = "history"  # history (child process) -> log (catching up) -> installing
    done: int = 0
    total: int = 0
    error: str | None = None
    cancelled: bool = False
    proc: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None


class FeatureManager:
    """The feature statements against one running engine; thread-safe. `read_log(a, b)` gives the log's
    events with a <= offset <= b; `model_in_use()` the serving model's version (None: no model)."""

    def __init__(self, engine: FeatureEngine, history_dir: str | Path, read_log: ReadLog,
                 model_in_use: Callable[[], str | None] = lambda: None) -> None:
        if engine.state_dir is None:
            raise ValueError("a FeatureManager needs an engine opened on a state directory")
        self.engine = engine
        self.state_dir = engine.state_dir
        self.history_dir = history_dir  # a directory, or an object-store URI (str), as [log] history gives it
        self.read_log = read_log
        self.model_in_use = model_in_use
        self._lock = threading.RLock()
        self._jobs: dict[str, _Backfill] = {}
        self._failed: dict[str, _Backfill] = {}
        self._changes = self._load_changes()
        shutil.rmtree(self.state_dir / BACKFILL_DIR, ignore_errors=True)  # a restart restarts backfills
        for f in engine.unbuilt:
            log.warning("feature %s is declared but not in the snapshot: backfilling it again", f.name)
            self._start(f)

    # -- statements -----------------------------------------------------------------------------

    def execute(self, stmt: FeatureStatement, sql: str, who: str) -> tuple[list[str], list[list[Any]]]:
        """Carry out a parsed statement; returns (columns, rows) for the query interface's answer."""
        if stmt.kind == "create":
            assert stmt.feature is not None
            self.create(stmt.feature, sql, who)
            return self.describe(stmt.feature.name)
        if stmt.kind == "drop":
            assert stmt.name is not None
            f = self.drop(stmt.name, sql, who)
            return ["dropped", "sql"], [[f.name, to_sql(f)]]
        if stmt.kind == "show":
            return self.show()
        assert stmt.name is not None
        return self.describe(stmt.name, sql)

    def create(self, feature: Feature, sql: str, who: str) -> None:
        """Declare `feature` and start its backfill (the statement returns at once)."""
        if feature.window.kind == "sliding" and feature.window.length_ms > MAX_WINDOW_MS:
            raise FeatureStatementError(
                f"the window of {feature.name!r} is {feature.window.length_ms // DAY_MS} days, longer than the "
                f"{MAX_WINDOW_MS // DAY_MS} days a feature may cover", code="window_too_long",
                position=_window_position(sql))
        with self._lock:
            if feature.name in self.engine.registry or feature.name in self._jobs:
                raise FeatureStatementError(
                    f"feature {feature.name!r} is already declared; DROP FEATURE {feature.name} first to redefine it",
                    code="duplicate_feature", position=name_position(sql))
            self._failed.pop(feature.name, None)
            self._record("create", feature, sql, who)
            self._start(feature)
            self._save()

    def drop(self, name: str, sql: str, who: str) -> Feature:
        """Retire feature `name` (served, backfilling or failed). Refused (409) for a feature the serving
        model reads."""
        with self._lock:
            job = self._jobs.pop(name, None) or self._failed.pop(name, None)
            if job is None:
                if name not in self.engine.registry:
                    raise FeatureStatementError(f"unknown feature {name!r}; SHOW FEATURES lists them",
                                                404, code="unknown_feature", position=name_position(sql))
                model = self.model_in_use()
                if name in MODEL_FEATURES and model is not None:
                    raise FeatureStatementError(
                        f"feature {name!r} is read by the serving model (version {model}); retrain without it or "
                        "remove the model before dropping it", 409, code="feature_in_use",
                        position=name_position(sql))
                feature = self.engine.drop(name)
            else:
                feature = job.feature
                job.cancelled = True
                if job.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        job.proc.kill()
            self._record("drop", feature, sql, who)
            self._save()
        return feature

    def show(self) -> tuple[list[str], list[list[Any]]]:
        """One row per declared feature: name, entity, aggregation, window, status, sql."""
        with self._lock:
            rows = [[f.name, f.entity, f.agg, _window_text(f), "serving", to_sql(f)] for f in self.engine.registry]
            rows += [[j.feature.name, j.feature.entity, j.feature.agg, _window_text(j.feature),
                      f"backfilling ({self._percent(j)})", to_sql(j.feature)] for j in self._jobs.values()]
            rows += [[j.feature.name, j.feature.entity, j.feature.agg, _window_text(j.feature), "failed",
                      to_sql(j.feature)] for j in self._failed.values()]
        return ["name", "entity", "aggregation", "window", "status", "sql"], sorted(rows)

    def describe(self, name: str, sql: str = "") -> tuple[list[str], list[list[Any]]]:
        """(property, value) rows: the declaration, its SQL, window and tiles, status, state size,
        freshness, backfill progress, and who declared it when."""
        with self._lock:
            job = self._jobs.get(name) or self._failed.get(name)
            if job is None and name not in self.engine.registry:
                raise FeatureStatementError(f"unknown feature {name!r}; SHOW FEATURES lists them", 404,
                                            code="unknown_feature", position=name_position(sql) if sql else None)
            f = job.feature if job is not None else self.engine.registry[name]
            props: dict[str, Any] = {
                "name": f.name, "sql": to_sql(f), "entity": f.entity, "aggregation": f.agg, "field": f.field,
                "k": f.k or None, "actions": ",".join(f.actions) if f.actions else None,
                "window": _window_text(f), "tile": _ms_text(f.window.tile_ms) if f.window.tile_ms else None,
                "tiles": f.window.tiles or None, "hash": f.hash(),
            }
            if job is None:
                e = self.engine
                props |= {"status": "serving", "state_keys": e.state_keys(name), "applied_offset": e.applied_offset,
                          "watermark": _iso(e.watermark) if e.watermark >= 0 else None}
            elif name in self._failed:
                props |= {"status": "failed", "error": job.error}
            else:
                props |= {"status": "backfilling", "phase": job.phase, "progress": self._percent(job),
                          "events_done": job.done, "events_total": job.total,
                          "running_s": round(time.time() - job.started, 1)}
            change = next((c for c in reversed(self._changes) if c["feature"] == name and c["op"] == "create"), None)
            if change is not None:
                props |= {"declared_by": change["who"], "declared_at": change["at"], "version": change["version"]}
        return ["property", "value"], [[k, v] for k, v in props.items()]

    # -- state ----------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The number of changes recorded so far (the registry's version)."""
        return len(self._changes)

    def pending(self) -> list[str]:
        """Features declared and still backfilling."""
        with self._lock:
            return sorted(self._jobs)

    def backfilling(self) -> dict[str, tuple[Feature, str]]:
        """Name -> (declaration, progress) of the features still backfilling (EXPLAIN names them)."""
        with self._lock:
            return {name: (job.feature, self._percent(job)) for name, job in self._jobs.items()}

    def wait(self, name: str, timeout: float = 60.0) -> str:
        """Block until `name` is no longer backfilling; returns "serving", "failed" or "dropped"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if name in self._failed:
                    return "failed"
                if name not in self._jobs:
                    return "serving" if name in self.engine.registry else "dropped"
            time.sleep(0.02)
        raise TimeoutError(f"feature {name!r} is still backfilling after {timeout}s")

    def close(self) -> None:
        """Stop the backfills (killed children, joined threads); a restart starts them again."""
        with self._lock:
            jobs = list(self._jobs.values())
            for job in jobs:
                job.cancelled = True
                if job.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        job.proc.kill()
        for job in jobs:
            if job.thread is not None:
                job.thread.join(timeout=30)

    def _percent(self, job: _Backfill) -> str:
        if job.phase == "installing":
            return "installing"
        share = job.done / job.total if job.total else 0.0
        return f"{job.phase} {100 * share:.0f}%"

    def _save(self) -> None:
        """registry.json: what is declared (served and backfilling), durable before the statement answers."""
        reg = self.engine.registry
        for job in self._jobs.values():
            reg = reg.plus(job.feature)
        reg.save(self.state_dir / REGISTRY_FILE)

    def _load_changes(self) -> list[dict[str, Any]]:
        path = self.state_dir / CHANGES_FILE
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a torn last line of a crash: not acknowledged
                out.append(json.loads(line))
        return out

    def _record(self, op: str, feature: Feature, sql: str, who: str) -> None:
        change = {"version": len(self._changes) + 1, "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                  "who": who, "op": op, "feature": feature.name, "hash": feature.hash(), "sql": sql}
        fd = os.open(self.state_dir / CHANGES_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(change) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._changes.append(change)

    # -- backfill -------------------------------------------------------------------------------

    def _start(self, feature: Feature) -> None:
        job = _Backfill(feature)
        self._jobs[feature.name] = job
        job.thread = threading.Thread(target=self._run, args=(job,), name=f"insession-backfill-{feature.name}",
                                      daemon=True)
        job.thread.start()

    def _run(self, job: _Backfill) -> None:
        f = job.feature
        out = self.state_dir / BACKFILL_DIR / f"{f.name}-{f.hash()}"
        try:
            staged = self._from_history(job, out)
            if staged is None:
                return
            job.phase = "log"
            while not job.cancelled and self.engine.applied_offset - staged.applied_offset > INSTALL_GAP:
                upto = self.engine.applied_offset
                job.done, job.total = 0, upto - staged.applied_offset
                for chunk in chunked(self.read_log(staged.applied_offset + 1, upto), CATCH_UP_CHUNK):
                    if job.cancelled:
                        return
                    began = time.perf_counter()
                    staged.update_many(chunk)
                    job.done += len(chunk)
                    time.sleep((time.perf_counter() - began) * (1 / CATCH_UP_DUTY - 1))
            with self._lock:
                if job.cancelled:
                    return
                job.phase = "installing"
            self.engine.install(staged, self.read_log)  # not under the manager's lock: DESCRIBE answers meanwhile
            with self._lock:
                if job.cancelled:  # dropped while it was being installed
                    self.engine.drop(f.name)
                    return
                del self._jobs[f.name]
            log.info("feature %s backfilled and served (%.1f s)", f.name, time.time() - job.started)
            self.engine.snapshot()  # a restart now serves it without another backfill
        except Exception as e:
            log.exception("backfill of feature %s failed", f.name)
            with self._lock:
                job.error = f"{type(e).__name__}: {e}"
                if self._jobs.get(f.name) is job:
                    del self._jobs[f.name]
                    self._failed[f.name] = job
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def _from_history(self, job: _Backfill, out: Path) -> FeatureEngine | None:
        """The child process's part (see backfill.py); None when cancelled."""
        e, f = self.engine, job.feature
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        spec = Job(f.to_json(), e.registry.lateness_ms, e.registry.session_gap_ms, e.partitions, e.max_users,
                   str(self.history_dir))
        (out / JOB_FILE).write_bytes(msgspec.json.encode(spec))
        with self._lock, (out / "stderr.txt").open("wb") as stderr:
            if job.cancelled:
                return None
            job.proc = subprocess.Popen([sys.executable, "-m", "insession.features.backfill", str(out)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        while job.proc.poll() is None:
            with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
                p = msgspec.json.decode((out / PROGRESS_FILE).read_bytes(), type=Progress)
                job.done, job.total = p.done, p.total
            time.sleep(0.2)
        if job.cancelled:
            return None
        if job.proc.returncode != 0:
            lines = (out / "stderr.txt").read_text(errors="replace").strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"backfill process exited with {job.proc.returncode}")
        reg = FeatureRegistry.of([f], lateness_ms=e.registry.lateness_ms, session_gap_ms=e.registry.session_gap_ms)
        return FeatureEngine.open(out / "state", reg, partitions=e.partitions, max_users=e.max_users)


def _ms_text(ms: int) -> str:
    for unit, size in (("day", DAY_MS), ("hour", 3_600_000), ("minute", 60_000), ("second", 1000)):
        if ms % size == 0:
            n = ms // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{ms} ms"


def _window_text(f: Feature) -> str:
    w = f.window
    return f"{_ms_text(w.length_ms)} in {_ms_text(w.tile_ms)} tiles" if w.kind == "sliding" else w.kind


def _window_position(sql: str) -> dict[str, int]:
    at = sql.upper().find("INTERVAL")
    if at < 0:
        return {}
    line = sql.count("\n", 0, at) + 1
    return {"line": line, "col": at - (sql.rfind("\n", 0, at) + 1) + 1}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")

"""The ranking service: features + candidates + the reranker under a deadline, fallbacks, hygiene, hot reload.

One request: read the shopper's features once (history, session, top categories), take the given
candidates or run the candidate stage, read the counters, then encode history and session once and
score every candidate in one batched pass on a model thread, waiting at most for what is left of the
request's budget. A feature read error, a model error, a blown budget or a missing model gives a
fallback ranking (see `insession.rank.fallback`), flagged in the response and counted in metrics.
Hygiene (see `insession.rank.hygiene`) runs on every list, model or fallback, before it leaves.
The request instant the model sees (hours since each event, calendar) is the feature engine's watermark,
the clock every feature was read at, so replays and imported history rank as they would have live.

Hot reload: `reload()` loads an artefact beside the serving one, refuses it when its feature-declaration
hash differs from the running feature set, warms it, then swaps one reference; a request reads that
reference once, so it finishes on the model it started with and no request fails during a swap.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np
import torch

from insession.durable import write_atomic
from insession.features import FeatureEngine
from insession.features.declare import pinned_hash
from insession.log.catalog import Catalog
from insession.model import COUNTERS, Explanation
from insession.model.artefact import Artefact, load_artefact, versions
from insession.model.reranker import SIGNALS
from insession.rank.candidates import CandidateQuotas, PopularItems, propose, sources_for
from insession.rank.fallback import fallback_ranking
from insession.rank.hygiene import HygieneRules, apply_hygiene, eligible
from insession.rank.inputs import (
    ItemIndex,
    Shopper,
    counters,
    covisit_counts,
    item_counts,
    query_tensor,
    sequence,
    signals,
)
from insession.rank.onnx import ExportStopped, OnnxScorer
from insession.schema import MAX_ID_LEN

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = ("no_model", "feature_error", "model_error", "timeout")
SERVING_FILE = "SERVING"  # under the model directory: the version the server serves (feature readers follow it)
STARTUP_BACKEND_WAIT_S = 300.0  # at most this long for the ONNX export at start; eager PyTorch serves after


@dataclass(frozen=True)
class RankConfig:
    """Service settings; `budget_ms` is the default per-request deadline (a request may set its own)."""

    budget_ms: float = 25.0
    max_budget_ms: float = 10_000.0
    max_candidates: int = 500
    default_k: int = 20
    explain_items: int = 5  # how many of the top items get an explanation
    explain_events: int = 3  # events per side (history, session) in each explanation
    hygiene: HygieneRules = field(default_factory=HygieneRules)
    quotas: CandidateQuotas = field(default_factory=CandidateQuotas)
    model_threads: int = 2  # concurrent model passes (a pool: the deadline can abandon a slow one)
    popular_ttl_s: float = 60.0  # how often the per-category 28-day popular lists are rebuilt
    # "onnx": score with ONNX Runtime once the artefact's export is ready (eager PyTorch until then);
    # "torch": eager PyTorch only. Both give the same scores; ORT is faster (docs/benchmarks.md).
    backend: str = "onnx"
    # torch intra-op threads for the process (None: leave as is). One thread per pass, passes in
    # parallel on the model threads: on a shared 2-core machine a multi-threaded pass waits on busy cores.
    torch_threads: int | None = 1


_Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_LEN)] | int


class RankRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /v1/rank` body: rank `candidates` (or the candidate stage's proposals) for `user_id` now.

    Ids are bounded like the schema's (at most MAX_ID_LEN characters) when decoded from JSON."""

    user_id: _Id
    session_id: _Id | None = None  # echoed; the session ranked on is the user's current one
    surface: Annotated[str, msgspec.Meta(max_length=MAX_ID_LEN)] | None = None  # echoed (home, search, ...)
    candidates: list[_Id] | None = None  # at most RankConfig.max_candidates; None: candidate stage
    k: int | None = None  # how many items to return (default RankConfig.default_k)
    budget_ms: float | None = None  # the deadline for this request (default RankConfig.budget_ms)
    explain: bool = False


class RankedItem(msgspec.Struct):
    item_id: str
    score: float
    category: str


class ExplainedEvent(msgspec.Struct):
    item_id: str
    action: str
    ts: int
    weight: float  # the candidate's pooling attention on this event


class ItemExplanation(msgspec.Struct):
    """Why an item ranked where it did: the events it attended to most, and how much the session counted."""

    item_id: str
    session_weight: float  # the fusion gate: weight of the session side against the history side
    history: list[ExplainedEvent]
    session: list[ExplainedEvent]


class RankResponse(msgspec.Struct):
    user_id: str
    items: list[RankedItem]
    model_version: str | None
    fallback: str | None  # None: the model ranked; else trending / popularity / input_order
    fallback_reason: str | None  # no_model / feature_error / model_error / timeout
    candidate_source: str  # request / candidate_stage
    candidates: int  # how many were scored
    hygiene_drops: dict[str, int]
    timings_ms: dict[str, float]
    session_id: str | None = None
    surface: str | None = None
    explanations: list[ItemExplanation] | None = None


class RankRequestError(ValueError):
    """A request the service will not run (bad sizes or values); HTTP 422."""


class ArtefactRefused(ValueError):
    """A model artefact that does not fit the running service (its feature declarations differ)."""


class ModelInfo(msgspec.Struct):
    version: str
    path: str
    feature_hash: str
    loaded_at_ms: int
    backend: str  # what scores right now: "onnx" (ONNX Runtime) or "torch" (eager, also while exporting)
    metrics: dict[str, Any]
    skipped: dict[str, str] = {}  # newer versions refused when this one was loaded: version -> why


@dataclass
class _Loaded:
    artefact: Artefact
    version: str
    loaded_at_ms: int
    index: ItemIndex
    skipped: dict[str, str] = field(default_factory=dict)
    onnx: OnnxScorer | None = None  # set once the ONNX graph is ready (read once per request)
    onnx_ready: threading.Event = field(default_factory=threading.Event)  # set when export ended (or failed)

    @property
    def info(self) -> ModelInfo:
        art = self.artefact
        backend = "onnx" if self.onnx is not None else "torch"
        return ModelInfo(self.version, str(art.path), art.feature_hash, self.loaded_at_ms, backend,
                         art.metrics, self.skipped)


@dataclass
class _Job:
    """One request between its stages."""

    req: RankRequest
    user_id: str
    k: int
    started: float
    deadline: float
    model: _Loaded | None
    shopper: Shopper | None = None
    items: list[str] = field(default_factory=list)
    source: str = "request"
    counters: np.ndarray | None = None
    signals: np.ndarray | None = None
    reason: str | None = None  # why the model is skipped
    timings: dict[str, float] = field(default_factory=dict)

    def remaining_s(self) -> float:
        return self.deadline - time.perf_counter()

    def lap(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[name] = round((now - since) * 1000.0, 3)
        return now


def _load(path: Path) -> Artefact:
    """`load_artefact` of one version, with anything but a missing artefact reported as a refusal."""
    try:
        return load_artefact(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # weights of another architecture, a truncated file, ...
        log.warning("model artefact %s cannot be loaded", path, exc_info=True)
        first = str(e).splitlines()[0] if str(e) else ""
        raise ArtefactRefused(
            f"model artefact {path.name} cannot be loaded by this version of insession ({type(e).__name__}"
            f"{': ' + first if isinstance(e, ValueError) else ''}); retrain it with "
            "`insession train`"
        ) from e


_Scored = tuple[np.ndarray, Explanation | None]
_NOTHING: _Scored = (np.zeros(0, np.float32), None)


class Ranker:
    """The ranking service over one feature engine and catalogue; thread-safe; `rank` or `await arank`.

    `model_dir` is a directory of versioned artefacts (what `insession train` writes) or one version;
    the newest valid one is loaded, warmed and (backend "onnx") exported before the constructor returns.
    Without a model every request is answered by the fallback ranking, flagged `no_model`. `fault` is a
    test hook called with the stage name ("features", "model") inside each stage; raising or sleeping in
    it forces that stage to fail.

    `publish`: the server's ranker records the version it serves in `model_dir/SERVING` after each swap; a
    feature reader's ranker (`publish` off) starts on that version and follows it (`follow_published`), so a
    reader ranks with the model the server ranks with, also after a reload to an older version (a rollback).
    """

    def __init__(
        self,
        features: FeatureEngine,
        catalog: Catalog,
        model_dir: Path | None = None,
        config: RankConfig | None = None,
        *,
        publish: bool = False,
    ) -> None:
        self.publish = publish
        self.features = features
        self.catalog = catalog
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.config = config or RankConfig()
        self.popular = PopularItems(features, catalog, ttl_s=self.config.popular_ttl_s)
        self.popular.refresh()  # built once here, so no request pays for it
        self.fault: Callable[[str], None] | None = None
        self.last_reload_error: str | None = None
        self._model: _Loaded | None = None
        self._reload_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.config.model_threads, thread_name_prefix="insession-rank")
        self._closing = threading.Event()  # set by close(): an export in progress stops
        self._exporters: list[threading.Thread] = []  # ONNX exports started by reload(), joined by close()
        if self.config.torch_threads is not None:
            torch.set_num_threads(self.config.torch_threads)
        if self.model_dir is not None and self.model_dir.exists():  # no directory: nothing trained yet
            try:
                self.reload(None if publish else self.published())
            except (FileNotFoundError, ArtefactRefused) as e:
                log.warning("ranking without a model: %s", e)
            else:
                # The first request must not share the cores with the ONNX export (it timed out doing so):
                # a service is ready once its model scores on its final backend, warmed.
                self.backend_ready(STARTUP_BACKEND_WAIT_S)

    # -- the model ------------------------------------------------------------------------------

    @property
    def model(self) -> ModelInfo | None:
        loaded = self._model
        return loaded.info if loaded else None

    def reload(self, path: Path | None = None) -> ModelInfo:
        """Load an artefact, check it, warm it, swap it in; `path` is one version or a directory of them
        (default: `model_dir`), where the newest version that loads and fits serves: a broken or
        mismatched newer one is skipped with a warning in the log and named in `ModelInfo.skipped`.

        Raises ArtefactRefused (every candidate version refused: the newest one's reason) or
        FileNotFoundError; the serving model is untouched then.
        """
        src = Path(path) if path is not None else self.model_dir
        if src is None:
            raise FileNotFoundError("no model path given and the ranker has no model_dir")
        with self._reload_lock:
            try:
                loaded = self._first_valid(versions(src))
            except Exception as e:
                self.last_reload_error = f"{type(e).__name__}: {e}"
                raise
            self._model = loaded  # the swap: one reference assignment
            self.last_reload_error = None
            if self.publish and self.model_dir is not None and (self.model_dir / loaded.version).is_dir():
                write_atomic(self.model_dir / SERVING_FILE, loaded.version + "\n")
        log.info("serving model %s", loaded.version)
        if self.config.backend == "onnx":
            exporter = threading.Thread(target=self._to_onnx, args=(loaded,), name="insession-onnx", daemon=True)
            self._exporters = [t for t in self._exporters if t.is_alive()] + [exporter]
            exporter.start()
        else:
            loaded.onnx_ready.set()
        return loaded.info

    def published(self) -> Path | None:
        """The version the server serves, as its ranker recorded it under `model_dir` (None: none recorded)."""
        if self.model_dir is None:
            return None
        try:
            version = (self.model_dir / SERVING_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return self.model_dir / version if version and Path(version).name == version else None

    def follow_published(self) -> bool:
        """Load the version the server serves if it is not the one serving here; whether it loaded one.
        Raises as `reload` does (the model serving here stays)."""
        path = self.published()
        loaded = self._model
        if path is None or (loaded is not None and loaded.version == path.name):
            return False
        self.reload(path)
        return True

    def _first_valid(self, candidates: list[Path]) -> _Loaded:
        """The newest of `candidates` that loads and fits the running features, loaded and warmed."""
        skipped: dict[str, str] = {}
        first_refusal: ArtefactRefused | None = None
        for version_dir in candidates:
            try:
                art = _load(version_dir)
                running = pinned_hash(self.features.registry)
                if art.feature_hash != running:
                    raise ArtefactRefused(
                        f"model artefact {version_dir.name} was trained on feature declarations {art.feature_hash}, "
                        f"but this service runs declarations {running}; retrain it on the running feature "
                        "set (`insession train`) before loading it"
                    )
            except ArtefactRefused as e:
                log.warning("skipping model version %s: %s", version_dir.name, e)
                skipped[version_dir.name] = str(e)
                first_refusal = first_refusal or e
                continue
            loaded = _Loaded(art, version_dir.name, int(time.time() * 1000), ItemIndex(art.vocab, self.catalog),
                             skipped)
            self._warm(loaded)
            if skipped:
                log.warning("serving model %s; newer versions refused: %s", loaded.version, ", ".join(skipped))
            return loaded
        assert first_refusal is not None
        raise first_refusal

    def _to_onnx(self, loaded: _Loaded) -> None:
        """Export (or load the cached export of) the artefact for ONNX Runtime, then switch to it.

        Requests are served by eager PyTorch meanwhile; if the export fails, they stay on it.
        """
        try:
            scorer = OnnxScorer(loaded.artefact.path, self.config.torch_threads or 1, stop=self._closing)
            self._warm(loaded, scorer)
            loaded.onnx = scorer
            log.info("model %s now scores with ONNX Runtime", loaded.version)
        except ExportStopped:
            log.info("model %s: the ONNX export was stopped (the ranker is closing)", loaded.version)
        except Exception as e:
            log.warning("model %s stays on eager PyTorch: ONNX export failed: %s", loaded.version, e)
        finally:
            loaded.onnx_ready.set()

    def backend_ready(self, timeout_s: float | None = None) -> str | None:
        """Wait until the serving model's ONNX export ended (if any); returns its backend (None: no model)."""
        loaded = self._model
        if loaded is None:
            return None
        loaded.onnx_ready.wait(timeout_s)
        return loaded.info.backend

    def _warm(self, loaded: _Loaded, onnx: OnnxScorer | None = None) -> None:
        """One pass on a dummy request, so the first real request after a swap pays no warm-up."""
        now_ms = int(time.time() * 1000)
        shopper = Shopper("", [], [{"item_id": "warm-up", "action": "view", "ts": now_ms}], [], now_ms, ["warm up"])
        self._score(loaded, shopper, None, ["warm-up"], np.zeros((1, len(COUNTERS)), np.float32),
                    np.zeros((1, len(SIGNALS)), np.float32), explain=True, onnx=onnx)

    def _score(
        self, loaded: _Loaded, shopper: Shopper, surface: str | None, items: list[str], counts: np.ndarray,
        sigs: np.ndarray, explain: bool, onnx: OnnxScorer | None = None,
    ) -> _Scored:
        """Encode history, session (with its queries) and the request's surface once, score all candidates in
        one batched pass (ORT when ready)."""
        if self.fault is not None:
            self.fault("model")
        model, index = loaded.artefact.model, loaded.index
        onnx = onnx or loaded.onnx
        with torch.inference_mode():
            history = sequence(index, shopper.history, model.cfg.max_history)
            session = sequence(index, shopper.session, model.cfg.max_session)
            now = torch.tensor([shopper.at_ms])
            where = torch.from_numpy(loaded.artefact.vocab.surface_index([surface]))
            queries = query_tensor(shopper.queries)
            cand = torch.from_numpy(index(items))
            if onnx is not None:
                scores, why = onnx(history, session, now, where, queries, cand, torch.from_numpy(counts),
                                   torch.from_numpy(sigs))
                return scores, why if explain else None
            enc = model.encode(history, session, now, where, queries)
            out = model.score(enc, cand, torch.from_numpy(counts), explain=explain, signals=torch.from_numpy(sigs))
        if explain:
            scores_t, why_t = out  # type: ignore[misc]
            return scores_t.numpy(), why_t
        return out.numpy(), None  # type: ignore[union-attr]

    # -- requests -------------------------------------------------------------------------------

    def rank(self, req: RankRequest) -> RankResponse:
        """Rank for one shopper, within the request's budget (blocking)."""
        job = self._begin(req)
        if job.reason is not None or not job.items:  # a fallback, or nothing to score
            return self._finish(job, None if job.reason else _NOTHING)
        future = self._submit(job)
        try:
            result: _Scored | BaseException = future.result(timeout=max(job.remaining_s(), 0.0))
        except FutureTimeout:
            future.cancel()
            result = TimeoutError()
        except Exception as e:  # the model failed: fall back, never fail the request
            result = e
        return self._finish(job, result)

    async def arank(self, req: RankRequest) -> RankResponse:
        """`rank` for an event loop: the model pass runs on a model thread, the loop is free meanwhile."""
        job = self._begin(req)
        if job.reason is not None or not job.items:  # a fallback, or nothing to score
            return self._finish(job, None if job.reason else _NOTHING)
        future = self._submit(job)
        try:
            result: _Scored | BaseException = await asyncio.wait_for(
                asyncio.wrap_future(future), max(job.remaining_s(), 0.0)
            )
        except TimeoutError:
            future.cancel()
            result = TimeoutError()
        except Exception as e:
            result = e
        return self._finish(job, result)

    def _submit(self, job: _Job) -> Future[_Scored]:
        job.timings["queued_at"] = time.perf_counter()
        return self._pool.submit(self._score_in_time, job)

    def _score_in_time(self, job: _Job) -> _Scored:
        """The model thread's work; a job whose deadline passed while it queued is dropped unscored, so an
        overloaded service sheds stale work instead of queueing it (its request already fell back)."""
        if job.remaining_s() <= 0:
            raise TimeoutError("deadline passed in the model queue")
        assert job.model is not None and job.shopper is not None
        assert job.counters is not None and job.signals is not None
        return self._score(job.model, job.shopper, job.req.surface, job.items, job.counters, job.signals,
                           job.req.explain)

    def _validate(self, req: RankRequest) -> tuple[str, int, float]:
        cfg = self.config
        user_id = str(req.user_id)
        if not user_id:
            raise RankRequestError("user_id must not be empty")
        if req.candidates is not None and len(req.candidates) > cfg.max_candidates:
            raise RankRequestError(
                f"{len(req.candidates)} candidates given; at most {cfg.max_candidates} per request "
                "(or none, to use the built-in candidate stage)"
            )
        k = cfg.default_k if req.k is None else req.k
        if not 1 <= k <= cfg.max_candidates:
            raise RankRequestError(f"k must be between 1 and {cfg.max_candidates}, got {k}")
        budget = cfg.budget_ms if req.budget_ms is None else req.budget_ms
        if not 0 < budget <= cfg.max_budget_ms:
            raise RankRequestError(f"budget_ms must be in (0, {cfg.max_budget_ms:g}], got {budget:g}")
        return user_id, k, budget

    def _begin(self, req: RankRequest) -> _Job:
        """Validate, read features, pick candidates, read counters: everything before the model."""
        user_id, k, budget = self._validate(req)
        started = time.perf_counter()
        job = _Job(req, user_id, k, started, started + budget / 1000.0, self._model)
        if req.candidates is not None:
            job.items = list(dict.fromkeys(str(c) for c in req.candidates))
        try:
            if self.fault is not None:
                self.fault("features")
            job.shopper = Shopper.read(self.features, user_id)
            if job.shopper.at_ms < 0:  # nothing ingested yet: the wall clock is the only clock
                job.shopper.at_ms = int(time.time() * 1000)
            covisit = covisit_counts(self.features, job.shopper.session, self.config.quotas.session)
            if req.candidates is None:
                job.items, job.source = self._propose(job.shopper, covisit), "candidate_stage"
            if job.model is not None and job.items:
                job.counters = counters(self.features, user_id, job.items)
                job.signals = signals(self.catalog, job.shopper, covisit, job.items)
        except Exception as e:  # a feature read failed: rank without the model
            log.warning("rank %s: feature lookup failed: %s", user_id, e)
            job.reason = "feature_error"
            if req.candidates is None:
                job.items, job.source = self._popular_fallback(), "candidate_stage"
        job.lap("features", started)
        if job.reason is None:
            if job.model is None:
                job.reason = "no_model"
            elif job.remaining_s() <= 0:
                job.reason = "timeout"
        return job

    def _propose(self, shopper: Shopper, covisit: dict[str, dict[str, int]]) -> list[str]:
        """The candidate stage on online features (`covisit`: the session items' neighbour counts)."""
        lists = self.popular.get()
        sources = sources_for(
            shopper.session,
            shopper.top_categories,
            lambda item: list(covisit.get(item, {})),
            lists.per_category,
            [t["item_id"] for t in self.features.read("trending_items_2h", None)],
            lists.top,
            self.config.quotas,
            history=[e["item_id"] for e in shopper.history],
            search_results=self.popular.search_results,
        )
        purchased = shopper.purchased
        rules = self.config.hygiene
        return propose(sources, lambda i: eligible(i, self.catalog, purchased, rules), self.config.quotas)

    def _popular_fallback(self) -> list[str]:
        """Candidates when the features cannot be read: the cached popular list (no feature read)."""
        return list(self.popular.cached().top[: self.config.quotas.n])

    def _finish(self, job: _Job, result: _Scored | BaseException | None) -> RankResponse:
        """Model scores or a fallback ranking, then hygiene, metrics and the response."""
        t = time.perf_counter()
        queued = job.timings.pop("queued_at", None)
        if queued is not None:
            job.timings["model"] = round((t - queued) * 1000.0, 3)
        why: Explanation | None = None
        if isinstance(result, tuple):
            scores, why = result
            order = np.argsort(-scores, kind="stable")
            ranked = [(job.items[i], float(scores[i])) for i in order]
            fallback = None
        else:
            if isinstance(result, TimeoutError):
                job.reason = "timeout"
            elif isinstance(result, BaseException):
                log.warning("rank %s: model failed: %r", job.user_id, result)
                job.reason = "model_error"
            fallback, ranked = fallback_ranking(
                job.items,
                lambda items: item_counts(self.features, "item_trending_2h", items),
                lambda items: item_counts(self.features, "item_count_28d", items),
            )
        purchased = job.shopper.purchased if job.shopper is not None else set()
        kept, drops = apply_hygiene(ranked, job.k, self.catalog, purchased, self.config.hygiene)
        items = [RankedItem(i, s, self.catalog.get(i).category) for i, s in kept]  # type: ignore[union-attr]
        explanations = None
        if job.req.explain and why is not None and job.shopper is not None and job.model is not None:
            explanations = self._explain(job, kept, why, job.model.artefact.model.cfg)
        t = job.lap("finish", t)
        job.timings["total"] = round((t - job.started) * 1000.0, 3)
        return RankResponse(
            user_id=job.user_id,
            items=items,
            model_version=job.model.info.version if job.model is not None and fallback is None else None,
            fallback=fallback,
            fallback_reason=job.reason if fallback is not None else None,
            candidate_source=job.source,
            candidates=len(job.items),
            hygiene_drops=dict(drops),
            timings_ms=job.timings,
            session_id=None if job.req.session_id is None else str(job.req.session_id),
            surface=job.req.surface,
            explanations=explanations,
        )

    def _explain(
        self, job: _Job, kept: list[tuple[str, float]], why: Explanation, cfg: Any
    ) -> list[ItemExplanation]:
        assert job.shopper is not None
        position = {item: i for i, item in enumerate(job.items)}
        sides = (
            (job.shopper.history[-cfg.max_history:], why.history_attention[0].numpy()),
            (job.shopper.session[-cfg.max_session:], why.session_attention[0].numpy()),
        )
        gate = why.gate[0].numpy()
        n = self.config.explain_events
        out = []
        for item, _ in kept[: self.config.explain_items]:
            c = position[item]
            events: list[list[ExplainedEvent]] = []
            for seq, weights in sides:
                w = weights[c, : len(seq)]
                top = [int(j) for j in np.argsort(-w, kind="stable")[:n] if w[j] > 0]
                events.append([ExplainedEvent(seq[j]["item_id"], seq[j]["action"], seq[j]["ts"], float(w[j]))
                               for j in top])
            out.append(ItemExplanation(item, float(gate[c]), events[0], events[1]))
        return out

    def close(self) -> None:
        """Stop what the ranker runs and wait for it: an ONNX export in progress is stopped (its child
        process killed, its temporary file removed), queued passes are cancelled, running ones finish, the
        model and export threads are joined and the ONNX Runtime session is released. Nothing native of the
        ranker is left running for the interpreter's exit (tests/test_shutdown.py)."""
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for exporter in self._exporters:
            exporter.join()
        loaded = self._model
        if loaded is not None:
            loaded.onnx = None  # ORT joins the session's threads as it frees it, here rather than at exit

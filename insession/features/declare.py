"""Feature declarations as data: windows, features, the persisted registry and the default feature set."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from insession.durable import write_atomic
from insession.schema import ACTIONS, Event

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

Entity = Literal["user", "user_item", "item", "global"]
WindowKind = Literal["unbounded", "sliding", "session", "before_session"]
AggKind = Literal["count", "sum", "last", "last_n", "distinct_topk", "topk_count", "counts_by_action", "age", "covisit"]

ENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "user": ("user_id",),
    "user_item": ("user_id", "item_id"),
    "item": ("item_id",),
    "global": (),
}
# Text columns of a stored event an aggregation may read (brand and price_band are catalogue attributes
# joined at ingest); `properties.<name>` reads a property of the event: its text values for last /
# distinct_topk / topk_count, its numbers for sum. NUMBER_FIELDS: numeric columns sum may read.
VALUE_FIELDS = ("item_id", "category", "subcategory", "action", "surface", "session_id", "brand", "price_band")
NUMBER_FIELDS = ("price",)
PROPERTY_PREFIX = "properties."
_PROPERTY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
SEQUENCE_FIELDS = ("item_id", "action", "ts", "category")  # what one element of a last_n sequence holds
_NEEDS_FIELD = {"sum", "last", "distinct_topk", "topk_count"}
_NEEDS_K = {"last_n", "distinct_topk", "topk_count", "covisit"}


@dataclass(frozen=True)
class Window:
    """Which events an aggregation sees at read time t.

    - unbounded: every event so far;
    - sliding(length, tile): events in the `length // tile` tiles ending with the tile holding t, i.e.
      ts >= (t // tile - length // tile + 1) * tile: the window covers between length - tile and
      length of event time, and its edge moves one tile at a time (the same rule online and offline);
    - session: the user's current session (empty when it has closed by inactivity);
    - before_session: the user's events before the current session (last_n only).
    """

    kind: WindowKind = "unbounded"
    length_ms: int = 0
    tile_ms: int = 0

    def __post_init__(self) -> None:
        if self.kind == "sliding":
            if self.tile_ms <= 0 or self.length_ms <= 0 or self.length_ms % self.tile_ms:
                raise ValueError("a sliding window needs length_ms > 0 that is a multiple of tile_ms > 0")
        elif self.length_ms or self.tile_ms:
            raise ValueError(f"a {self.kind} window has no length or tile")

    @property
    def tiles(self) -> int:
        return self.length_ms // self.tile_ms if self.kind == "sliding" else 0

    def start(self, t: int) -> int | None:
        """The smallest event time inside the window read at t (None: no lower edge)."""
        if self.kind != "sliding":
            return None
        return (t // self.tile_ms - self.tiles + 1) * self.tile_ms


def sliding(length_ms: int, tile_ms: int) -> Window:
    return Window("sliding", length_ms, tile_ms)


UNBOUNDED = Window()
SESSION = Window("session")
BEFORE_SESSION = Window("before_session")


@dataclass(frozen=True)
class Feature:
    """One declared feature (Chronon GroupBy / Feast FeatureView in spirit).

    `agg` and its parameters: count; sum(field: `properties.<name>` or price); last(field); last_n(k): the k
    latest events as {item_id, action, ts, category}, oldest first; distinct_topk(field, k): distinct
    values, most recent first; topk_count(field, k): [{field: value, count: n}] by count; counts_by_action:
    {action: n} for every action; age: ms from the earliest event in the window to t; covisit(k, span,
    gap_ms): for an item, the k items most often seen within `span` events and `gap_ms` of it in the
    same session. `actions` filters events before aggregation (None: all).
    """

    name: str
    entity: Entity
    agg: AggKind
    window: Window = UNBOUNDED
    field: str | None = None
    k: int = 0
    actions: tuple[str, ...] | None = None
    span: int = 0
    gap_ms: int = 0

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"feature name {self.name!r} must be an identifier")
        if self.entity not in ENTITY_KEYS:
            raise ValueError(f"{self.name}: unknown entity {self.entity!r}")
        if self.agg in _NEEDS_FIELD:
            prop = self.property_name
            if prop is not None and not _PROPERTY_NAME.fullmatch(prop):
                raise ValueError(f"{self.name}: property name {prop!r} must be an identifier of at most 64 "
                                 "characters (letters, digits, _)")
            if prop is None and self.field in NUMBER_FIELDS and not self.reads_number:
                raise ValueError(f"{self.name}: {self.agg} reads text, and {self.field} is a number, which has no "
                                 "one text form the online and offline engines agree on; use price_band")
            if prop is None and self.field not in (NUMBER_FIELDS if self.reads_number else VALUE_FIELDS):
                allowed = NUMBER_FIELDS if self.reads_number else VALUE_FIELDS
                raise ValueError(f"{self.name}: {self.agg} cannot read field {self.field!r}; it reads "
                                 f"{', '.join(allowed)} or {PROPERTY_PREFIX}<name>")
        elif self.field is not None:
            raise ValueError(f"{self.name}: {self.agg} takes no field")
        if (self.agg in _NEEDS_K) != (self.k > 0):
            raise ValueError(f"{self.name}: k > 0 is required by last_n/distinct_topk/topk_count/covisit only")
        if self.actions is not None and (not self.actions or set(self.actions) - set(ACTIONS)):
            raise ValueError(f"{self.name}: actions must be a non-empty subset of {ACTIONS}")
        if self.window.kind in ("session", "before_session") and self.entity != "user":
            raise ValueError(f"{self.name}: session windows are per user")
        if self.window.kind == "before_session" and self.agg != "last_n":
            raise ValueError(f"{self.name}: a before_session window supports last_n only")
        if self.agg == "covisit":
            if self.entity != "item" or self.span <= 0 or self.gap_ms <= 0:
                raise ValueError(f"{self.name}: covisit is per item and needs span > 0 and gap_ms > 0")
            if self.window.kind in ("session", "before_session"):
                raise ValueError(f"{self.name}: covisit needs an unbounded or sliding window")
        elif self.span or self.gap_ms:
            raise ValueError(f"{self.name}: span/gap_ms belong to covisit")

    @property
    def keys(self) -> tuple[str, ...]:
        return ENTITY_KEYS[self.entity]

    @property
    def reads_number(self) -> bool:
        """sum reads numbers; every other aggregation with a field reads text."""
        return self.agg == "sum"

    @property
    def property_name(self) -> str | None:
        """`<name>` for a field `properties.<name>`, else None."""
        f = self.field
        return f[len(PROPERTY_PREFIX):] if f is not None and f.startswith(PROPERTY_PREFIX) else None

    def value(self, ev: Event) -> str | None:
        """The text this feature reads from an event (None: the event has none and is skipped). A property
        counts only when its value is text (decision: numbers and booleans have no one text form that
        Python and SQL engines agree on); `offline._value_sql` is the SQL twin."""
        prop = self.property_name
        if prop is None:
            return getattr(ev, self.field or "")
        v = (ev.properties or {}).get(prop)
        return v if isinstance(v, str) else None

    def number(self, ev: Event) -> float | None:
        """The number a sum reads from an event (None: skipped): a numeric property (not a boolean) or
        the item's price."""
        prop = self.property_name
        v = getattr(ev, self.field or "") if prop is None else (ev.properties or {}).get(prop)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["actions"] = list(self.actions) if self.actions is not None else None
        return d

    def hash(self) -> str:
        """Stable across processes: names a feature's state in snapshots, so a feature dropped and declared
        again differently never restores the old one's state."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Feature:
        d = dict(d)
        d["window"] = Window(**d["window"])  # type: ignore[arg-type]
        if d.get("actions") is not None:
            d["actions"] = tuple(d["actions"])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


@dataclass
class FeatureRegistry:
    """The declared features plus the two stream rules they share (lateness, session gap).

    `hash()` is stable across processes and Python versions: the trainer stores it in model artefacts and
    the ranking service refuses a model whose hash differs from the engine's.
    """

    features: dict[str, Feature] = field(default_factory=dict)
    lateness_ms: int = 5 * MINUTE_MS
    session_gap_ms: int = 30 * MINUTE_MS

    def add(self, feature: Feature) -> None:
        if feature.name in self.features:
            raise ValueError(f"feature {feature.name!r} is already declared")
        self.features[feature.name] = feature

    def __iter__(self) -> Iterator[Feature]:
        return iter(self.features.values())

    def __getitem__(self, name: str) -> Feature:
        try:
            return self.features[name]
        except KeyError:
            raise KeyError(f"unknown feature {name!r}; declared: {', '.join(self.features)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.features

    def of_entity(self, entity: str) -> list[Feature]:
        return [f for f in self if f.entity == entity]

    def to_json(self) -> dict[str, object]:
        return {
            "lateness_ms": self.lateness_ms,
            "session_gap_ms": self.session_gap_ms,
            "features": [f.to_json() for f in self],
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> FeatureRegistry:
        feats = [Feature.from_json(f) for f in d["features"]]  # type: ignore[union-attr]
        return cls({f.name: f for f in feats}, int(d["lateness_ms"]), int(d["session_gap_ms"]))  # type: ignore[arg-type]

    def hash(self, names: Iterable[str] | None = None) -> str:
        """Of the stream rules and the features `names` (default: all). A model pins the hash of the
        features it reads (`MODEL_FEATURES`), so declaring or dropping another feature never makes the
        ranker refuse it. Raises KeyError naming a feature in `names` that is not declared."""
        body = self.to_json()
        if names is not None:
            wanted = set(names)
            for name in wanted:
                self[name]  # noqa: B018 - raises the readable KeyError
            body["features"] = [f for f in body["features"] if f["name"] in wanted]  # type: ignore[union-attr, index]
        body["features"] = sorted(body["features"], key=lambda f: f["name"])  # type: ignore[arg-type, index]
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def rules_hash(self) -> str:
        """Of the rules every feature's state depends on (lateness, session gap): what a snapshot must share."""
        return hashlib.sha256(f"{self.lateness_ms}:{self.session_gap_ms}".encode()).hexdigest()[:16]

    def plus(self, feature: Feature) -> FeatureRegistry:
        """A copy with `feature` declared too (copy-on-write: readers keep the registry they hold)."""
        out = FeatureRegistry(dict(self.features), self.lateness_ms, self.session_gap_ms)
        out.add(feature)
        return out

    def minus(self, name: str) -> FeatureRegistry:
        """A copy without the feature `name`."""
        self[name]  # noqa: B018 - raises the readable KeyError
        return FeatureRegistry({n: f for n, f in self.features.items() if n != name}, self.lateness_ms,
                               self.session_gap_ms)

    def save(self, path: Path) -> None:
        """Write atomically and durably (temporary file, fsync, rename, directory fsync)."""
        write_atomic(Path(path), json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> FeatureRegistry:
        return cls.from_json(json.loads(Path(path).read_text()))

    @classmethod
    def of(cls, features: Iterable[Feature], **rules: int) -> FeatureRegistry:
        reg = cls(**rules)
        for f in features:
            reg.add(f)
        return reg


def default_features() -> list[Feature]:
    """The features the Dual Sequence ReRanker and the candidate stage read (names are a contract)."""
    return [
        Feature(
            "top_categories_15d",
            "user",
            "distinct_topk",
            sliding(15 * DAY_MS, HOUR_MS),
            "category",
            5,
            actions=("view",),
        ),
        Feature("history_seq", "user", "last_n", BEFORE_SESSION, k=100),
        Feature("session_seq", "user", "last_n", SESSION, k=50),
        Feature("session_queries", "user", "distinct_topk", SESSION, "properties.query", 5, actions=("search",)),
        Feature("session_length", "user", "count", SESSION),
        Feature("session_age", "user", "age", SESSION),
        Feature("user_item_count_28d", "user_item", "counts_by_action", sliding(28 * DAY_MS, HOUR_MS)),
        Feature("item_count_28d", "item", "counts_by_action", sliding(28 * DAY_MS, HOUR_MS)),
        Feature("item_trending_2h", "item", "count", sliding(2 * HOUR_MS, MINUTE_MS)),
        Feature("trending_items_2h", "global", "topk_count", sliding(2 * HOUR_MS, MINUTE_MS), "item_id", 50),
        Feature("covisit", "item", "covisit", sliding(7 * DAY_MS, DAY_MS), k=20, span=5, gap_ms=30 * MINUTE_MS),
    ]


def default_registry() -> FeatureRegistry:
    return FeatureRegistry.of(default_features())


# The features the reranker and the candidate stage read: a model artefact pins their declarations (the
# hash of this subset), not the whole registry; dropping one of them is refused while a model serves.
MODEL_FEATURES: tuple[str, ...] = tuple(f.name for f in default_features())


def pinned_hash(registry: FeatureRegistry) -> str | None:
    """The hash a model artefact pins: of the stream rules and the declarations of `MODEL_FEATURES` (the
    whole registry's hash when it holds just those), so declaring or dropping any other feature never
    takes a model out of service. None when one of them is not declared."""
    if any(name not in registry for name in MODEL_FEATURES):
        return None
    return registry.hash(MODEL_FEATURES)

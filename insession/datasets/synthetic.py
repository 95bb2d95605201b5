"""Synthetic quick-commerce shop: seeded catalogue, shoppers with habits and staples, intent-driven sessions.

The model of the shop (everything drawn from one numpy Generator per purpose and day, so a seed always
gives the same shop, whatever is read first):

- Catalogue: categories > subcategories > items (a fixed quick-commerce taxonomy, cut to the catalogue
  size); item popularity is Zipf over a random rank (a long tail); a share of items appears after day 0
  (cold start) with a short novelty boost; a few items are out of stock (never added to a cart).
- Shoppers: habitual subcategories (sparse gamma weights), an activity rate, and staples: items of
  replenishable subcategories (milk, diapers, detergent, ...) re-bought on a cadence of days.
- Sessions: each has an INTENT, a subcategory and its category. A browsing session draws its intent from
  the shopper's habits times the category's hour-of-day and day-of-week profile (breakfast in the
  morning, snacks late at night, household at weekends); a replenishment session targets a due staple.
  Most views fall in the intent subcategory or category; the rest are noise from global popularity.
- Funnel: an optional search, views, add_to_cart (likelier on-intent), favorite, remove_from_cart, and a
  checkout that turns the remaining cart into purchases.

`Shop.sessions` holds every session's intent; every event also carries it in properties
(`intent`, `intent_subcategory`) so a test can check that a model ranks the intended category first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from insession.datasets.files import EVENT_CORE_SCHEMA, events_from_table
from insession.schema import ACTIONS

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
DEFAULT_START_MS = 1_788_220_800_000  # 2026-09-01T00:00:00Z: fixed, so a seed always gives the same shop


@dataclass(frozen=True)
class CategorySpec:
    """One top-level category of the taxonomy and when shoppers come for it."""

    name: str
    peak_hour: int  # hour of day (UTC) at which sessions most often target this category
    weekend: float  # how much likelier this category is as an intent on Saturday and Sunday
    subcategories: tuple[str, ...]
    replenishable: tuple[str, ...] = ()  # subcategories whose items are re-bought on a cadence


TAXONOMY: tuple[CategorySpec, ...] = (
    CategorySpec("dairy_breakfast", 7, 1.0, ("milk", "bread", "eggs", "butter_cheese", "cereals", "yogurt"),
                 ("milk", "bread", "eggs")),
    CategorySpec("snacks", 21, 1.4, ("chips", "biscuits", "chocolates", "namkeen", "nuts")),
    CategorySpec("household", 12, 2.0, ("detergent", "dishwash", "cleaners", "tissues", "garbage_bags"),
                 ("detergent", "dishwash", "tissues")),
    CategorySpec("fruits_vegetables", 9, 1.3, ("fresh_fruits", "fresh_vegetables", "herbs", "exotic_fruits"),
                 ("fresh_fruits", "fresh_vegetables")),
    CategorySpec("beverages", 16, 1.2, ("soft_drinks", "juices", "tea", "coffee", "energy_drinks"),
                 ("tea", "coffee")),
    CategorySpec("meals", 23, 1.5, ("ready_to_eat", "instant_noodles", "frozen_meals", "ice_cream")),
    CategorySpec("staples", 11, 1.6, ("rice", "flour", "pulses", "cooking_oil", "spices"),
                 ("rice", "flour", "cooking_oil")),
    CategorySpec("personal_care", 19, 1.1,
                 ("shampoo", "soap_bodywash", "oral_care", "skin_care", "deodorants"),
                 ("soap_bodywash", "oral_care")),
    CategorySpec("baby_care", 5, 1.0, ("diapers", "baby_food", "baby_wipes", "baby_bath"),
                 ("diapers", "baby_wipes")),
    CategorySpec("pet_care", 18, 1.3, ("dog_food", "cat_food", "pet_treats", "cat_litter"),
                 ("dog_food", "cat_food", "cat_litter")),
    CategorySpec("pharmacy", 1, 0.9, ("pain_relief", "vitamins", "first_aid", "cold_flu")),
    CategorySpec("electronics", 14, 1.7, ("chargers", "earphones", "batteries", "bulbs")),
)
BRANDS = ("Nova", "Daily", "Green Leaf", "Urban", "Pure", "Happy Cow", "Royal", "Prime", "Sunny", "Harvest",
          "Blue Hill", "Kiran", "Zesty", "Orchard", "Maple", "Swift", "Homely", "Crest", "Lotus", "Amber")

# Catalogue
ITEMS_PER_CATEGORY = 100  # one more taxonomy category per 100 items, between 3 and all of them
MIN_CATEGORIES = 3
ZIPF_EXPONENT = 1.05
NEW_ITEM_SHARE = 0.08  # items that appear after day 0
NOVELTY_BOOST, NOVELTY_DAYS = 4.0, 3.0  # a new item is shown more for its first days
OUT_OF_STOCK_SHARE = 0.04
BRANDS_PER_CATEGORY = 6
# Shoppers
HABIT_SHAPE = 0.3  # gamma shape of a shopper's subcategory weights: small = a few habitual subcategories
HABIT_FLOOR = 0.02  # everybody sometimes shops outside their habits
ACTIVITY_SIGMA = 0.8  # lognormal spread of shoppers' session rates
STAPLES_MEAN, MAX_STAPLES = 1.2, 4
CADENCE_DAYS = np.array([2, 3, 4, 5, 7, 10, 14])
CADENCE_P = np.array([0.1, 0.2, 0.2, 0.15, 0.2, 0.1, 0.05])
P_REPLENISH_DUE = 0.85  # a due staple is re-bought that day (else skipped until the next due day)
# Sessions
SESSIONS_PER_USER_DAY = 0.6  # mean browsing sessions per shopper and day when no target size is given
MAX_SESSIONS_PER_DAY = 12  # at most one session per hour slot, so a shopper's sessions never overlap
MAX_MEAN_SESSIONS = 6.0  # a target size needing more sessions per shopper-day than this is refused
TIME_KAPPA = 1.3  # sharpness of the hour-of-day intent profile (peak/trough = exp(2 kappa))
DOW_ACTIVITY = np.array([1.0, 0.95, 0.95, 1.0, 1.1, 1.3, 1.25])  # Monday .. Sunday
MEAN_VIEWS_BROWSE, MAX_VIEWS_BROWSE = 6.0, 60
MEAN_VIEWS_REPLENISH, MAX_VIEWS_REPLENISH = 3.0, 30
VIEW_GAP_MEDIAN_MS, VIEW_GAP_SIGMA = 25_000, 0.9
MAX_SESSION_SPAN_MS = 45 * 60_000
SESSION_START_JITTER_MS = 12 * 60_000  # within its hour slot, so a session ends before the next slot
SEARCH_LEAD_MS = 8_000
LAST_VIEW_DWELL_MS = 15_000
# Funnel
P_INTENT_SUBCATEGORY, P_INTENT_CATEGORY = 0.6, 0.25  # where a view's item comes from (rest: anywhere)
P_REVISIT = 0.12
P_CART_SUBCATEGORY, P_CART_CATEGORY, P_CART_OFF_INTENT, P_CART_STAPLE = 0.15, 0.07, 0.02, 0.9
P_FAVORITE = 0.03
P_REMOVE = 0.12
P_CHECKOUT_BROWSE, P_CHECKOUT_REPLENISH = 0.45, 0.92
P_SEARCH_BROWSE, P_SEARCH_REPLENISH = 0.3, 0.5
PILOT_SESSIONS = 4000

VIEW, ADD_TO_CART, REMOVE_FROM_CART, PURCHASE, FAVORITE, SEARCH = (ACTIONS.index(a) for a in (
    "view", "add_to_cart", "remove_from_cart", "purchase", "favorite", "search"))
ACTION_RANK = np.empty(len(ACTIONS), np.int64)  # tie-break at equal ts: the funnel's order
ACTION_RANK[[SEARCH, VIEW, FAVORITE, ADD_TO_CART, REMOVE_FROM_CART, PURCHASE]] = np.arange(6)
SURFACES = ("home", "search", "category", "pdp", "cart", "checkout")
HOME, SEARCH_PAGE, CATEGORY_PAGE, PDP, CART, CHECKOUT = range(len(SURFACES))
KINDS = ("browse", "replenish")

EVENT_SCHEMA = EVENT_CORE_SCHEMA.append(pa.field("intent", pa.string())).append(
    pa.field("intent_subcategory", pa.string())).append(pa.field("query", pa.string()))
SESSION_SCHEMA = pa.schema([
    ("session_id", pa.string()), ("user_id", pa.string()), ("start_ts", pa.int64()), ("kind", pa.string()),
    ("intent_category", pa.string()), ("intent_subcategory", pa.string()), ("staple_item_id", pa.string()),
    ("hour", pa.int64()), ("dow", pa.int64()),
])


class _GroupSampler:
    """Draws items by weight within a group (subcategory, category or everything) in one searchsorted."""

    def __init__(self, group: np.ndarray, weight: np.ndarray, n_groups: int) -> None:
        self.order = np.argsort(group, kind="stable")
        g, w = group[self.order], weight[self.order]
        totals = np.bincount(g, weights=w, minlength=n_groups)
        if np.any(totals <= 0):
            raise ValueError("every group needs an item with positive weight")
        cum = np.cumsum(w)
        before = np.concatenate(([0.0], np.cumsum(totals)))[g]
        self.cdf = g + (cum - before) / totals[g]  # within (g, g + 1]
        self.cdf[np.cumsum(np.bincount(g, minlength=n_groups)) - 1] = np.arange(n_groups) + 1.0  # exact ends

    def sample(self, groups: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One item per entry of `groups`; `u` uniform in (0, 1]."""
        return self.order[np.searchsorted(self.cdf, groups + u)]


@dataclass
class _Sessions:
    """One day's sessions as parallel arrays, in start order."""

    user: np.ndarray
    start: np.ndarray  # epoch ms
    hour: np.ndarray
    sub: np.ndarray  # intent subcategory
    staple: np.ndarray  # the staple item a replenishment session is for; -1 for browsing
    has_search: np.ndarray


@dataclass
class _Events:
    """Events of a batch of sessions as parallel arrays, in time order."""

    sess: np.ndarray
    item: np.ndarray
    action: np.ndarray
    ts: np.ndarray
    surface: np.ndarray
    seq: np.ndarray  # position within its session


def _categorical(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of a non-negative weight matrix."""
    cdf = np.cumsum(weights, axis=1)
    u = (1.0 - rng.random(len(weights))) * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(axis=1), weights.shape[1] - 1)


class Shop:
    """A generated shop: `items` (ItemIn wire form), events in time order, and sessions with their intent."""

    zipf_exponent: float = ZIPF_EXPONENT
    sessions_per_user_day: float = SESSIONS_PER_USER_DAY
    dow_activity: np.ndarray = DOW_ACTIVITY
    staples_mean: float = STAPLES_MEAN

    def __init__(self, n_users: int, n_items: int, days: int, seed: int, start_ms: int,
                 target_events: int | None) -> None:
        n_cat = min(max(n_items // ITEMS_PER_CATEGORY, MIN_CATEGORIES), len(TAXONOMY))
        specs = TAXONOMY[:n_cat]
        n_subs = sum(len(s.subcategories) for s in specs)
        if n_users < 1 or days < 1 or n_items < 2 * n_subs:
            raise ValueError(f"need n_users >= 1, days >= 1 and n_items >= {2 * n_subs}")
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.n_users, self.n_items, self.days = n_users, n_items, days
        self.seed, self.start_ms = seed, start_ms
        rng = np.random.default_rng([seed, 0xCA7A])
        self.categories = [s.name for s in specs]
        self.subcategories = [sub for s in specs for sub in s.subcategories]
        self.sub_cat = np.array([c for c, s in enumerate(specs) for _ in s.subcategories])
        self.sub_replenishable = np.array([sub in s.replenishable for s in specs for sub in s.subcategories])
        self._build_catalogue(rng, specs)
        self._build_shoppers(rng)
        self._build_time_profiles(specs)
        self._calibrate(target_events)

    # -- construction ---------------------------------------------------------------------------------

    def _build_catalogue(self, rng: np.random.Generator, specs: tuple[CategorySpec, ...]) -> None:
        n, n_subs = self.n_items, len(self.subcategories)
        self.sub_weight = rng.dirichlet(np.full(n_subs, 3.0)) * n_subs
        counts = 2 + rng.multinomial(n - 2 * n_subs, self.sub_weight / n_subs)
        self.item_sub = rng.permutation(np.repeat(np.arange(n_subs), counts))
        self.item_cat = self.sub_cat[self.item_sub]
        self.item_pop = (rng.permutation(n) + 1.0) ** -self.zipf_exponent
        # Every subcategory keeps its most popular item from day 0 (and in stock), so it can always be shown.
        order = np.lexsort((-self.item_pop, self.item_sub))  # by subcategory, most popular first
        best = order[np.searchsorted(self.item_sub[order], np.arange(n_subs))]
        anchor = np.zeros(n, bool)
        anchor[best] = True
        self.item_day = np.where(~anchor & (rng.random(n) < NEW_ITEM_SHARE) & (self.days > 1),
                                 rng.integers(1, max(self.days, 2), n), 0)
        self.item_available = anchor | (rng.random(n) >= OUT_OF_STOCK_SHARE)
        sub_price = np.exp(rng.normal(np.log(120.0), 0.7, n_subs))
        price = np.round(sub_price[self.item_sub] * np.exp(rng.normal(0.0, 0.3, n)), 2)
        cat_brands = np.array([rng.choice(len(BRANDS), BRANDS_PER_CATEGORY, replace=False) for _ in specs])
        brand_rank = rng.zipf(1.6, n).clip(max=BRANDS_PER_CATEGORY) - 1
        brand = cat_brands[self.item_cat, brand_rank]
        self.item_ids = [f"i{k:07d}" for k in range(n)]
        self._item_id_array = pa.array(self.item_ids, pa.string())
        self.items: list[dict] = [
            {"item_id": self.item_ids[k], "category": self.categories[self.item_cat[k]],
             "subcategory": self.subcategories[self.item_sub[k]], "price": float(price[k]),
             "available": bool(self.item_available[k]), "brand": BRANDS[brand[k]],
             "name": f"{BRANDS[brand[k]]} {self.subcategories[self.item_sub[k]].replace('_', ' ')} {k}"}
            for k in range(n)
        ]

    def _build_shoppers(self, rng: np.random.Generator) -> None:
        u, n_subs = self.n_users, len(self.subcategories)
        self._user_id_array = pa.array([f"u{k:07d}" for k in range(u)], pa.string())
        habit = (rng.gamma(HABIT_SHAPE, 1.0, (u, n_subs)) + HABIT_FLOOR) * self.sub_weight
        self.habit = habit.astype(np.float32)
        rate = rng.lognormal(0.0, ACTIVITY_SIGMA, u)
        self.rate = rate / rate.mean()
        # Staples: a few items of replenishable subcategories the shopper favours, each with a cadence.
        repl = np.flatnonzero(self.sub_replenishable)
        n_st = np.minimum(rng.poisson(self.staples_mean, u), min(MAX_STAPLES, len(repl)))
        keys = np.log(self.habit[:, repl]) + rng.gumbel(size=(u, len(repl)))
        top = np.argsort(-keys, axis=1)
        mask = np.arange(len(repl)) < n_st[:, None]
        self.st_user = np.repeat(np.arange(u), n_st)
        st_sub = repl[top[mask]]
        stock = _GroupSampler(self.item_sub, self.item_pop * (self.item_day == 0) * self.item_available,
                              n_subs)
        self.st_item = stock.sample(st_sub, 1.0 - rng.random(len(st_sub)))
        self.st_cadence = rng.choice(CADENCE_DAYS, len(st_sub), p=CADENCE_P)
        self.st_phase = rng.integers(0, self.st_cadence)

    def _build_time_profiles(self, specs: tuple[CategorySpec, ...]) -> None:
        hours = np.arange(24)
        peak = np.array([s.peak_hour for s in specs])[:, None]
        cat_hour = np.exp(TIME_KAPPA * np.cos(2 * np.pi * (hours[None, :] - peak) / 24))  # (n_cat, 24)
        weekend = np.array([s.weekend for s in specs])
        cat_dow = np.where(np.arange(7)[:, None] >= 5, weekend[None, :], 1.0)  # (7, n_cat)
        # sub_time[dow, hour, sub]: how likely each subcategory is as an intent at that time
        self.sub_time = cat_hour.T[None, :, self.sub_cat] * cat_dow[:, None, self.sub_cat]
        weekday = (0.15 + np.exp(-((hours - 8) ** 2) / 6) + 0.6 * np.exp(-((hours - 13) ** 2) / 10)
                   + 1.4 * np.exp(-((hours - 20) ** 2) / 8))
        weekend_day = (0.15 + 0.5 * np.exp(-((hours - 9) ** 2) / 8) + 1.2 * np.exp(-((hours - 13) ** 2) / 12)
                       + 1.2 * np.exp(-((hours - 20) ** 2) / 8))
        self.start_hour_w = np.where(np.arange(7)[:, None] >= 5, weekend_day[None, :], weekday[None, :])

    def _calibrate(self, target_events: int | None) -> None:
        """Pick the browsing-session rate: the default, or the one that makes about `target_events`."""
        rng = np.random.default_rng([self.seed, 0, 0x9170])
        users = rng.integers(0, self.n_users, PILOT_SESSIONS)
        hours = rng.choice(24, PILOT_SESSIONS, p=self.start_hour_w[0] / self.start_hour_w[0].sum())
        pilot = self._make_sessions(0, users, hours, np.full(PILOT_SESSIONS, -1), rng)
        per_browse = len(self._session_events(0, pilot, rng).ts) / PILOT_SESSIONS
        due = (np.arange(self.days)[None, :] - self.st_phase[:, None]) % self.st_cadence[:, None] == 0
        n_replenish = P_REPLENISH_DUE * due.sum()
        if len(self.st_item):
            staples = rng.integers(0, len(self.st_item), PILOT_SESSIONS)
            rep = self._make_sessions(0, self.st_user[staples], hours, self.st_item[staples], rng)
            per_replenish = len(self._session_events(0, rep, rng).ts) / PILOT_SESSIONS
        else:
            per_replenish = 0.0
        activity = self.n_users * self.dow_activity[[self._dow(d) for d in range(self.days)]].sum()
        if target_events is None:
            self.scale = self.sessions_per_user_day
        else:
            self.scale = max(target_events - n_replenish * per_replenish, 0.0) / (per_browse * activity)
            if self.scale > MAX_MEAN_SESSIONS:
                raise ValueError(
                    f"{target_events} events need ~{self.scale:.0f} sessions per shopper per day; "
                    f"use more users (n_users >= ~{int(target_events / (per_browse * 2 * self.days)) + 1})"
                    " or more days")
        self.expected_events = int(self.scale * activity * per_browse + n_replenish * per_replenish)

    # -- public views ---------------------------------------------------------------------------------

    @property
    def category_tree(self) -> dict[str, list[str]]:
        """category -> its subcategories."""
        return {c: [s for s, k in zip(self.subcategories, self.sub_cat, strict=True) if k == i]
                for i, c in enumerate(self.categories)}

    @property
    def replenishable_subcategories(self) -> list[str]:
        return [s for s, r in zip(self.subcategories, self.sub_replenishable, strict=True) if r]

    @property
    def item_created_ms(self) -> dict[str, int]:
        """item_id -> when the item appears (start of its first day); after day 0 means a cold start."""
        return {i: self.start_ms + int(d) * DAY_MS for i, d in zip(self.item_ids, self.item_day, strict=True)}

    @cached_property
    def sessions(self) -> pa.Table:
        """Every session with its intent (category and subcategory), kind, start, hour and day of week."""
        return pa.concat_tables([self._session_table(d, self._day_sessions(d)) for d in range(self.days)])

    @cached_property
    def intent_of(self) -> dict[str, str]:
        """session_id -> the session's intended category."""
        return dict(zip(self.sessions["session_id"].to_pylist(), self.sessions["intent_category"].to_pylist(),
                        strict=True))

    def iter_event_tables(self) -> Iterator[pa.Table]:
        """Events as Arrow tables (schema `EVENT_SCHEMA`), about one per day, in time order."""
        carry = EVENT_SCHEMA.empty_table()
        for d in range(self.days):
            table = pa.concat_tables([carry, self._day_events(d)])
            table = table.take(np.argsort(table["ts"].to_numpy(), kind="stable"))
            cut = int(np.searchsorted(table["ts"].to_numpy(), self.start_ms + (d + 1) * DAY_MS))
            if d == self.days - 1:
                cut = table.num_rows
            if cut:
                yield table.slice(0, cut)
            carry = table.slice(cut)

    def iter_events(self) -> Iterator[dict]:
        """Events in `EventIn` wire form, in time order; properties carry the session's intent."""
        for table in self.iter_event_tables():
            yield from events_from_table(table)

    # -- generation -----------------------------------------------------------------------------------

    def _dow(self, d: int) -> int:
        return ((self.start_ms // DAY_MS + d) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0

    def _make_sessions(self, d: int, users: np.ndarray, hours: np.ndarray, staple: np.ndarray,
                       rng: np.random.Generator) -> _Sessions:
        """Sessions of day `d` for (user, hour slot, staple or -1): draw intents and starts, sort by start."""
        dow = self._dow(d)
        replenish = staple >= 0
        sub = np.empty(len(users), np.int64)
        sub[replenish] = self.item_sub[staple[replenish]]
        browse = ~replenish
        sub[browse] = _categorical(self.habit[users[browse]] * self.sub_time[dow][hours[browse]], rng)
        start = self.start_ms + d * DAY_MS + hours * HOUR_MS + rng.integers(0, SESSION_START_JITTER_MS,
                                                                            len(users))
        has_search = rng.random(len(users)) < np.where(replenish, P_SEARCH_REPLENISH, P_SEARCH_BROWSE)
        o = np.argsort(start, kind="stable")
        return _Sessions(users[o], start[o], hours[o], sub[o], staple[o], has_search[o])

    def _day_sessions(self, d: int) -> _Sessions:
        rng = np.random.default_rng([self.seed, d, 1])
        dow = self._dow(d)
        due = np.flatnonzero(((d - self.st_phase) % self.st_cadence == 0)
                             & (rng.random(len(self.st_item)) < P_REPLENISH_DUE))  # sorted by user
        n_rep = np.bincount(self.st_user[due], minlength=self.n_users)
        n_browse = rng.poisson(self.rate * self.scale * self.dow_activity[dow])
        k = np.minimum(n_browse + n_rep, MAX_SESSIONS_PER_DAY)  # n_rep <= MAX_STAPLES < the cap
        active = np.flatnonzero(k)
        # Distinct hour slots per shopper-day (Gumbel top-k on the diurnal curve), so sessions never overlap.
        keys = np.log(self.start_hour_w[dow]) + rng.gumbel(size=(len(active), 24))
        slots = np.argsort(-keys, axis=1)
        mask = np.arange(24) < k[active][:, None]
        users = np.repeat(active, k[active])
        rank = np.broadcast_to(np.arange(24), mask.shape)[mask]
        staple = np.full(len(users), -1, np.int64)
        staple[rank < n_rep[users]] = self.st_item[due]
        return self._make_sessions(d, users, slots[mask], staple, rng)

    def _weights(self, d: int) -> np.ndarray:
        age = d - self.item_day
        boost = 1.0 + NOVELTY_BOOST * np.exp(-np.maximum(age, 0) / NOVELTY_DAYS)
        novelty = np.where(self.item_day > 0, boost, 1.0)
        return self.item_pop * novelty * (age >= 0)

    def _session_events(self, d: int, s: _Sessions, rng: np.random.Generator) -> _Events:
        """The funnel of each session: search?, views, favorites, carts, removals, checkout."""
        n = len(s.user)
        w = self._weights(d)
        by_sub = _GroupSampler(self.item_sub, w, len(self.subcategories))
        by_cat = _GroupSampler(self.item_cat, w, len(self.categories))
        anywhere = _GroupSampler(np.zeros(self.n_items, np.int64), w, 1)
        rep = s.staple >= 0
        n_views = np.where(rep, np.minimum(rng.geometric(1 / MEAN_VIEWS_REPLENISH, n), MAX_VIEWS_REPLENISH),
                           np.minimum(rng.geometric(1 / MEAN_VIEWS_BROWSE, n), MAX_VIEWS_BROWSE))
        si = np.repeat(np.arange(n), n_views)
        m = len(si)
        first = np.cumsum(n_views) - n_views
        pos = np.arange(m) - first[si]
        sub, cat = s.sub[si], self.sub_cat[s.sub[si]]
        # Which item each view shows: intent subcategory, intent category, or anything popular.
        r, u = rng.random(m), 1.0 - rng.random(m)
        item = np.empty(m, np.int64)
        in_sub = r < P_INTENT_SUBCATEGORY
        in_cat = ~in_sub & (r < P_INTENT_SUBCATEGORY + P_INTENT_CATEGORY)
        other = ~in_sub & ~in_cat
        item[in_sub] = by_sub.sample(sub[in_sub], u[in_sub])
        item[in_cat] = by_cat.sample(cat[in_cat], u[in_cat])
        item[other] = anywhere.sample(np.zeros(other.sum(), np.int64), u[other])
        forced = (pos == 0) & rep[si]
        item[forced] = s.staple[si[forced]]
        revisit = (pos > 0) & (rng.random(m) < P_REVISIT)  # look again at the last item not a revisit
        item = item[np.maximum.accumulate(np.where(revisit, 0, np.arange(m)))]
        # When: lognormal gaps, a search first if any, the span capped so the next hour slot stays free.
        gap = rng.lognormal(np.log(VIEW_GAP_MEDIAN_MS), VIEW_GAP_SIGMA, m)
        gap[pos == 0] = 0.0
        cum = np.cumsum(gap)
        offset = np.minimum(cum - cum[first[si]], MAX_SESSION_SPAN_MS).astype(np.int64)
        view_ts = s.start[si] + offset + np.where(s.has_search[si], SEARCH_LEAD_MS, 0)
        last = pos == n_views[si] - 1
        to_next = np.where(last, LAST_VIEW_DWELL_MS, np.roll(view_ts, -1) - view_ts)
        end = view_ts[last] + LAST_VIEW_DWELL_MS  # one per session
        # The funnel.
        item_in_sub = self.item_sub[item] == sub
        item_in_cat = self.item_cat[item] == cat
        p_cart = np.where(item_in_sub, P_CART_SUBCATEGORY,
                          np.where(item_in_cat, P_CART_CATEGORY, P_CART_OFF_INTENT))
        p_cart = np.where(forced, P_CART_STAPLE, p_cart) * self.item_available[item]
        cart = rng.random(m) < p_cart
        fav = rng.random(m) < P_FAVORITE
        removed = cart & ~forced & (rng.random(m) < P_REMOVE)
        checkout = rng.random(n) < np.where(rep, P_CHECKOUT_REPLENISH, P_CHECKOUT_BROWSE)
        bought = cart & ~removed & checkout[si]
        cart_ts = view_ts + to_next // 2
        remove_ts = cart_ts + ((end[si] - cart_ts) * rng.random(m)).astype(np.int64)
        pay_ts = end + rng.integers(20_000, 120_000, n)
        searched = np.flatnonzero(s.has_search)  # a search event names the item it led to (the first view)
        view_surface = np.where(pos == 0, np.where(s.has_search[si], SEARCH_PAGE, HOME),
                                np.where(item_in_cat, CATEGORY_PAGE, HOME))
        parts = [
            (si, item, VIEW, view_ts, view_surface),
            (searched, item[first[searched]], SEARCH, s.start[searched], SEARCH_PAGE),
            (si[fav], item[fav], FAVORITE, view_ts[fav] + to_next[fav] // 4, PDP),
            (si[cart], item[cart], ADD_TO_CART, cart_ts[cart], PDP),
            (si[removed], item[removed], REMOVE_FROM_CART, remove_ts[removed], CART),
            (si[bought], item[bought], PURCHASE, pay_ts[si[bought]], CHECKOUT),
        ]
        sess = np.concatenate([p[0] for p in parts])
        action = np.concatenate([np.full(len(p[0]), p[2]) for p in parts])
        ts = np.concatenate([p[3] for p in parts])
        surface = np.concatenate([np.broadcast_to(p[4], len(p[0])) for p in parts])
        items = np.concatenate([p[1] for p in parts])
        rank = ACTION_RANK[action]
        in_session = np.lexsort((rank, ts, sess))
        seq = np.empty(len(sess), np.int64)
        sizes = np.bincount(sess, minlength=n)
        seq[in_session] = np.arange(len(sess)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        o = np.lexsort((rank, sess, ts))
        return _Events(sess[o], items[o], action[o], ts[o], surface[o], seq[o])

    def _session_ids(self, d: int, n: int) -> pa.Array:
        return pa.array([f"s{d:04d}-{k:07d}" for k in range(n)], pa.string())

    def _day_events(self, d: int) -> pa.Table:
        s = self._day_sessions(d)
        ev = self._session_events(d, s, np.random.default_rng([self.seed, d, 2]))
        sessions = self._session_ids(d, len(s.user)).take(ev.sess)
        intent_sub = s.sub[ev.sess]
        return pa.table({
            "event_id": pc.binary_join_element_wise(sessions, pa.array(ev.seq).cast(pa.string()), "-"),
            "user_id": self._user_id_array.take(s.user[ev.sess]),
            "session_id": sessions,
            "item_id": self._item_id_array.take(ev.item),
            "action": pa.array(ACTIONS, pa.string()).take(ev.action),
            "ts": pa.array(ev.ts, pa.int64()),
            "surface": pa.array(SURFACES, pa.string()).take(ev.surface),
            "intent": pa.array(self.categories, pa.string()).take(self.sub_cat[intent_sub]),
            "intent_subcategory": pa.array(self.subcategories, pa.string()).take(intent_sub),
            "query": self._queries(d, ev, intent_sub),
        }, schema=EVENT_SCHEMA)

    def _queries(self, d: int, ev: _Events, intent_sub: np.ndarray) -> pa.Array:
        """The query text of each search event (null for other actions): the session's intent subcategory."""
        query = pa.array(self.subcategories, pa.string()).take(intent_sub)
        return pc.if_else(pa.array(ev.action == SEARCH), pc.replace_substring(query, "_", " "), None)

    def _session_table(self, d: int, s: _Sessions) -> pa.Table:
        replenish = s.staple >= 0
        staple_ids = self._item_id_array.take(np.maximum(s.staple, 0))
        return pa.table({
            "session_id": self._session_ids(d, len(s.user)),
            "user_id": self._user_id_array.take(s.user),
            "start_ts": pa.array(s.start, pa.int64()),
            "kind": pa.array(KINDS, pa.string()).take(replenish.astype(np.int64)),
            "intent_category": pa.array(self.categories, pa.string()).take(self.sub_cat[s.sub]),
            "intent_subcategory": pa.array(self.subcategories, pa.string()).take(s.sub),
            "staple_item_id": pc.if_else(pa.array(replenish), staple_ids, None),
            "hour": pa.array(s.hour, pa.int64()),
            "dow": pa.array(np.full(len(s.user), self._dow(d)), pa.int64()),
        }, schema=SESSION_SCHEMA)


def generate_shop(n_users: int, n_items: int, days: int, seed: int, start_ms: int | None = None,
                  target_events: int | None = None, realistic: bool = False) -> Shop:
    """A seeded synthetic shop. `target_events`: about that many events (else ~0.6 sessions per user-day,
    1.7 when realistic). `realistic`: sessions calibrated against the real Taobao sample
    (`insession.datasets.realistic`, docs/synthetic.md); else the easy intent-driven shop, whose carted
    item is always the latest view (the demo and the tests that check intents rely on it)."""
    start = DEFAULT_START_MS if start_ms is None else start_ms
    if realistic:
        from insession.datasets.realistic import RealisticShop  # it subclasses Shop

        return RealisticShop(n_users, n_items, days, seed, start, target_events)
    return Shop(n_users, n_items, days, seed, start, target_events)

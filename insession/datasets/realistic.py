"""The realistic synthetic shop: `Shop`'s catalogue, shoppers and session starts, with sessions calibrated
against the real Taobao sample (`taobao_userbehavior_head84k`) by `insession.datasets.stats.measure`.

Why: the default shop shows every carted item just before the cart, so session recency reached NDCG@10
0.999 on it and no method could be ranked. Here (targets measured on Taobao, docs/synthetic.md):

- Leaf categories: each taxonomy subcategory is cut into leaves of ~20 items (`milk_03`; Taobao's sample:
  19 items per category), at most `MAX_LEAVES`; the shop's `subcategories` are these leaves.
- Session length is lognormal (Taobao: p50 3, p90 15, mean 6 events); a session walks between leaves
  (Taobao: 53% of consecutive events change category): each event after the first switches with
  `P_SWITCH` to a leaf drawn from the shopper's strongest habits x trends x hour of day.
- An add-to-cart names an item viewed earlier in the session (not the one just before: Taobao 0.6% of
  carts follow a view of their item) only `P_CART_SESSION` of the time; else an item of the shopper's
  consideration set (viewed now and then across sessions: the "in history" share), a complement, or an
  item of the current leaf never viewed (carted from a listing: Taobao 84% of carts), drawn by
  weight ** `FRESH_CART_FLATTEN`. Its leaf was viewed earlier in the session for about half of the carts
  (Taobao 50%), so context still predicts it: popularity within the context leaf scores NDCG@10 0.035
  here, 0.022 on Taobao (stats.measure, `leaf_popularity_ndcg10`).
- Purchases: the session's latest cart, else a buy-now item; staples (few) give repeat purchases.
- Popularity: a flat Zipf over a catalogue several times the event count (Taobao's sample: 55k distinct
  items in 84k events, 74% of them seen once) plus trends: every day a few items and, now and then, a
  leaf get a boost that rises for `TREND_PEAK_DAYS` and fades over a few days (`RealisticShop.trends`).
- Time: sessions start by Taobao's hour-of-day profile (UTC; the shop's local time is UTC+8, so the
  categories' peak hours are local); weekends a little busier (Taobao: Sat/Sun 1.17/1.11 of an average
  day, which includes a partial Friday; the shop's days are whole, hence weights 1.26/1.17).

Assumptions the real sample cannot calibrate (it has neither surfaces nor queries):
- surfaces: `home` (a segment opened from the feed: habits and trends; consideration-set views),
  `search` (a segment opened by a search: the query's subcategory), `pdp` (browsing on from a product
  page: same subcategory; carts of items viewed in the session), `cart` (complements of the current
  category and consideration-set or staple items: replenishment), `checkout` (purchases);
- search events: `P_SEARCH` of the segments open with one. Its `query` property is what the shopper wants:
  the leaf subcategory's name of the item the search leads to, with that item's brand before it
  `P_QUERY_BRAND` of the time. The event's item is what a search log records, a result shown for the query,
  not the item the shopper goes on to pick: the top result, drawn from the query's leaf (and brand, when the
  query names one) by that day's popularity, trends included (`_search_results`). It is the picked item only
  as often as that popularity makes it so (a rare brand of a leaf has one item, which is then both). Before
  this, the event named the picked item, so a model read the target off the search (session recency scored
  NDCG@10 1.000 on the search surface);
- no remove_from_cart (Taobao has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from insession.datasets.synthetic import (
    ADD_TO_CART,
    CART,
    CHECKOUT,
    DAY_MS,
    FAVORITE,
    HOME,
    PDP,
    PURCHASE,
    SEARCH,
    SEARCH_PAGE,
    VIEW,
    Shop,
    _categorical,
    _Events,
    _GroupSampler,
    _Sessions,
)

# Taobao head84k, share of events per UTC hour (measured by stats.hour_profile, rounded).
TAOBAO_HOUR_SHARE = np.array([
    0.0326, 0.0402, 0.0446, 0.0459, 0.0405, 0.0508, 0.0501, 0.0552, 0.0541, 0.0459, 0.0493, 0.0653,
    0.0783, 0.0884, 0.0792, 0.0608, 0.0354, 0.0157, 0.0079, 0.0044, 0.0053, 0.0075, 0.0159, 0.0264])
LOCAL_UTC_OFFSET_H = 8  # the categories' peak hours are local time (Taobao: China, UTC+8)
# Sessions
SESSION_LEN_MEDIAN, SESSION_LEN_SIGMA, MAX_SESSION_LEN = 2.6, 1.25, 150
P_SWITCH = 0.5
GAP_MEDIAN_MS, GAP_SIGMA, MAX_GAP_MS = 40_000, 1.1, 10 * 60_000
MAX_SPAN_MS = 45 * 60_000  # within the hour slot's room, so a shopper's sessions never overlap
SEARCH_LEAD_MS = 8_000
# Actions of the events of a browsing session (Taobao: view 89.8%, cart 5.3%, favorite 2.8%, buy 2.1%)
ACTION_CODES = np.array([VIEW, ADD_TO_CART, FAVORITE, PURCHASE])
ACTION_P = np.array([0.84, 0.085, 0.044, 0.031])  # higher than the targets: see P_OPEN_VIEW
P_OPEN_VIEW = 0.6  # a segment's first event is a view this often (else drawn like the others)
# Where a cart's item comes from (the rest: the current subcategory, never viewed)
P_CART_SESSION, P_CART_SET, P_CART_COMPLEMENT = 0.11, 0.18, 0.04
P_VIEW_SET = 0.15  # a view of the shopper's consideration set (home surface)
P_BUY_CARTED = 0.35  # a purchase of the session's latest cart (else buy-now in the current subcategory)
CONSIDER_K = 10
FRESH_CART_FLATTEN = 0.5  # a never-viewed cart's item is drawn by weight ** this: flatter than views
HABIT_TOP = 32  # a segment's subcategory comes from the shopper's 32 strongest habits ...
P_EXPLORE = 0.15  # ... or, this often, from the whole shop by weight x trend
STAPLES_MEAN = 0.06
# Search
P_SEARCH, P_QUERY_BRAND = 0.15, 0.3
# Catalogue, popularity and trends
ITEMS_PER_LEAF = 20  # each taxonomy subcategory is cut into leaves of ~20 items (Taobao: 19 per category)
MAX_LEAVES = 3000  # but no more leaves than this in all (Taobao's sample: 2,913 categories)
ZIPF = 0.45
TREND_ITEMS_PER_DAY, TREND_ITEM_BOOST = 30, 40.0  # boost at the peak, in units of the median item weight
TREND_SUBS_PER_DAY, TREND_SUB_BOOST = 0.5, 3.0  # boost of the subcategory as a segment's choice
TREND_PEAK_DAYS = 1.0
TREND_SCHEMA = pa.schema([("kind", pa.string()), ("id", pa.string()), ("start_ms", pa.int64()),
                          ("peak_ms", pa.int64()), ("boost", pa.float64())])


@dataclass
class _SearchEvents(_Events):
    """`_Events` plus, for each search event, the item it led to (-1 elsewhere) and whether its query names a
    brand: what `RealisticShop._queries` writes the query text from, as the event's own item is a result."""

    led_to: np.ndarray
    branded: np.ndarray


def _trend_curve(age_days: np.ndarray) -> np.ndarray:
    """A trend's strength at an age in days: 0 before it starts, 1 at TREND_PEAK_DAYS, fading after."""
    a = np.maximum(age_days, 0.0) / TREND_PEAK_DAYS
    return a * np.exp(1.0 - a)


class RealisticShop(Shop):
    """A shop whose statistics follow the real Taobao sample (see the module docstring)."""

    zipf_exponent = ZIPF
    sessions_per_user_day = 1.7  # Taobao: 1.73 sessions per shopper and day
    # Saturday and Sunday over a weekday: set so the measured rates match Taobao's 1.17 and 1.11 of an average
    # day (whose average includes its partial first Friday, 0.65), over seeds 1, 2, 3, 7, 42.
    dow_activity = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.26, 1.17])
    staples_mean = STAPLES_MEAN

    def _build_catalogue(self, rng: np.random.Generator, specs: tuple) -> None:
        leaves = int(np.clip(self.n_items // (ITEMS_PER_LEAF * len(self.subcategories)), 1,
                             MAX_LEAVES // len(self.subcategories)))
        self.subcategories = [f"{sub}_{k:02d}" for sub in self.subcategories for k in range(leaves)]
        self.sub_cat = np.repeat(self.sub_cat, leaves)
        self.sub_replenishable = np.repeat(self.sub_replenishable, leaves)
        super()._build_catalogue(rng, specs)
        self.item_brand = np.array([it["brand"] for it in self.items])
        self.item_brand_code = np.unique(self.item_brand, return_inverse=True)[1].astype(np.int64)
        trng = np.random.default_rng([self.seed, 0x7E4D])
        n_it = TREND_ITEMS_PER_DAY * self.days
        candidates = np.flatnonzero(self.item_available)
        self.tr_item = trng.choice(candidates, n_it)
        self.tr_item_start = np.repeat(np.arange(self.days), TREND_ITEMS_PER_DAY) + trng.random(n_it)
        self.tr_item_start = np.maximum(self.tr_item_start, self.item_day[self.tr_item])
        self.tr_item_boost = TREND_ITEM_BOOST * np.median(self.item_pop) * trng.lognormal(0.0, 0.5, n_it)
        n_st = trng.poisson(TREND_SUBS_PER_DAY * self.days)
        self.tr_sub = trng.integers(0, len(self.subcategories), n_st)
        self.tr_sub_start = trng.random(n_st) * self.days
        self.tr_sub_boost = TREND_SUB_BOOST * trng.lognormal(0.0, 0.3, n_st)

    def _build_shoppers(self, rng: np.random.Generator) -> None:
        super()._build_shoppers(rng)
        crng = np.random.default_rng([self.seed, 0xC0D5])
        subs = _categorical(np.repeat(self.habit, CONSIDER_K, axis=0), crng)
        stock = _GroupSampler(self.item_sub, self.item_pop * (self.item_day == 0) * self.item_available,
                              len(self.subcategories))
        self.consider = stock.sample(subs, 1.0 - crng.random(len(subs))).reshape(self.n_users, CONSIDER_K)
        top = min(HABIT_TOP, len(self.subcategories))
        self.habit_top = np.argpartition(-self.habit, top - 1, axis=1)[:, :top]

    def _build_time_profiles(self, specs: tuple) -> None:
        super()._build_time_profiles(specs)
        local = (np.arange(24) + LOCAL_UTC_OFFSET_H) % 24
        self.sub_time = self.sub_time[:, local, :]
        self.start_hour_w = np.broadcast_to(TAOBAO_HOUR_SHARE, (7, 24)).copy()

    @property
    def trends(self) -> pa.Table:
        """Every trend: kind (`item` or `subcategory`), id, when it starts and peaks, and its boost."""
        def ms(days: np.ndarray) -> pa.Array:
            return pa.array((self.start_ms + days * DAY_MS).astype(np.int64), pa.int64())
        return pa.table({
            "kind": ["item"] * len(self.tr_item) + ["subcategory"] * len(self.tr_sub),
            "id": [self.item_ids[i] for i in self.tr_item] + [self.subcategories[s] for s in self.tr_sub],
            "start_ms": pa.concat_arrays([ms(self.tr_item_start), ms(self.tr_sub_start)]),
            "peak_ms": pa.concat_arrays([ms(self.tr_item_start + TREND_PEAK_DAYS),
                                         ms(self.tr_sub_start + TREND_PEAK_DAYS)]),
            "boost": np.concatenate([self.tr_item_boost, self.tr_sub_boost]),
        }, schema=TREND_SCHEMA)

    def _weights(self, d: int) -> np.ndarray:
        w = super()._weights(d).copy()
        np.add.at(w, self.tr_item, self.tr_item_boost * _trend_curve(d + 0.5 - self.tr_item_start))
        return w * (self.item_day <= d)

    def _sub_trend(self, d: int) -> np.ndarray:
        t = np.ones(len(self.subcategories))
        np.add.at(t, self.tr_sub, self.tr_sub_boost * _trend_curve(d + 0.5 - self.tr_sub_start))
        return t

    def _session_events(self, d: int, s: _Sessions, rng: np.random.Generator) -> _Events:
        """Each session: a walk over subcategories, its events' actions, items and surfaces, then searches."""
        n, n_subs = len(s.user), len(self.subcategories)
        w = self._weights(d)
        by_sub = _GroupSampler(self.item_sub, w, n_subs)
        by_cat = _GroupSampler(self.item_cat, w, len(self.categories))
        length = np.clip(np.rint(rng.lognormal(np.log(SESSION_LEN_MEDIAN), SESSION_LEN_SIGMA, n)), 1,
                         MAX_SESSION_LEN).astype(np.int64)
        si = np.repeat(np.arange(n), length)
        m = len(si)
        idx = np.arange(m)
        first = (np.cumsum(length) - length)[si]
        pos = idx - first
        user = s.user[si]
        # The subcategory walk: a segment starts at the first event and at each switch.
        switch = (pos > 0) & (rng.random(m) < P_SWITCH)
        opens = switch | (pos == 0)
        seg = np.maximum.accumulate(np.where(opens, idx, 0))
        chosen = np.full(m, -1)
        trend = self._sub_trend(d)
        sw_user, sw_hour = user[switch], s.hour[si[switch]]
        top = self.habit_top[sw_user]
        time_w = self.sub_time[self._dow(d)][sw_hour[:, None], top] * trend[top]
        habitual = top[np.arange(len(top)), _categorical(self.habit[sw_user[:, None], top] * time_w, rng)]
        anywhere = _GroupSampler(np.zeros(n_subs, np.int64), self.sub_weight * trend, 1)
        explore = anywhere.sample(np.zeros(len(top), np.int64), 1.0 - rng.random(len(top)))
        chosen[switch] = np.where(rng.random(len(top)) < P_EXPLORE, explore, habitual)
        sub = np.where(switch[seg], chosen[seg], s.sub[si])
        # Actions; a replenishment session carts its staple first and, when it goes on, buys it last.
        action = ACTION_CODES[rng.choice(len(ACTION_CODES), m, p=ACTION_P)]
        rep = s.staple[si] >= 0
        staple_cart = rep & (pos == 0)
        staple_buy = rep & (pos == length[si] - 1) & (pos > 0)
        action[opens & (rng.random(m) < P_OPEN_VIEW)] = VIEW  # a segment mostly opens on an item
        action[staple_cart], action[staple_buy] = ADD_TO_CART, PURCHASE
        # Items: by default a fresh draw from the current subcategory (trends included).
        item = by_sub.sample(sub, 1.0 - rng.random(m))
        searched = opens & (rng.random(m) < P_SEARCH)
        surface = np.where(opens, np.where(searched, SEARCH_PAGE, HOME), PDP)
        set_pick = self.consider[user, rng.integers(0, CONSIDER_K, m)]
        set_view = (action == VIEW) & ~opens & (rng.random(m) < P_VIEW_SET)
        item[set_view], surface[set_view] = set_pick[set_view], HOME
        # A random earlier event, not the one just before (Taobao: 0.6% of carts follow a view of their item).
        earlier = first + np.floor(rng.random(m) * np.maximum(pos - 1, 0)).astype(np.int64)
        earlier_view = (pos > 1) & (action[earlier] == VIEW)
        cart = (action == ADD_TO_CART) & ~staple_cart
        r = rng.random(m)
        c_sess = cart & (r < P_CART_SESSION) & earlier_view
        c_set = cart & ~c_sess & (r >= P_CART_SESSION) & (r < P_CART_SESSION + P_CART_SET)
        c_comp = cart & (r >= P_CART_SESSION + P_CART_SET) & (r < P_CART_SESSION + P_CART_SET + P_CART_COMPLEMENT)
        c_fresh = cart & ~c_sess & ~c_set & ~c_comp & ~staple_cart
        flat = _GroupSampler(self.item_sub, w ** FRESH_CART_FLATTEN, n_subs)
        item[c_fresh] = flat.sample(sub[c_fresh], 1.0 - rng.random(int(c_fresh.sum())))
        item[c_sess], surface[c_sess] = item[earlier[c_sess]], PDP
        item[c_set], surface[c_set] = set_pick[c_set], CART
        item[c_comp] = by_cat.sample(self.item_cat[item[c_comp]], 1.0 - rng.random(int(c_comp.sum())))
        surface[c_comp] = CART
        item[staple_cart], surface[staple_cart] = s.staple[si[staple_cart]], CART
        fav = action == FAVORITE
        fav_seen = fav & earlier_view
        item[fav_seen], surface[fav] = item[earlier[fav_seen]], PDP
        latest_cart = np.maximum.accumulate(np.where(action == ADD_TO_CART, idx, -1))
        last_cart = np.concatenate(([-1], latest_cart[:-1]))
        buy = action == PURCHASE
        bought_cart = buy & (last_cart >= first) & (rng.random(m) < P_BUY_CARTED)
        item[bought_cart] = item[last_cart[bought_cart]]
        item[staple_buy] = s.staple[si[staple_buy]]
        surface[buy] = CHECKOUT
        # When: lognormal gaps, capped, inside the session's room; a search comes just before its segment.
        gap = np.minimum(rng.lognormal(np.log(GAP_MEDIAN_MS), GAP_SIGMA, m), MAX_GAP_MS)
        gap[searched] = np.maximum(gap[searched], 2 * SEARCH_LEAD_MS)  # room for the search before it
        gap[pos == 0] = 0.0
        cum = np.cumsum(gap)
        ts = s.start[si] + SEARCH_LEAD_MS + np.minimum(cum - cum[first], MAX_SPAN_MS).astype(np.int64)
        q = np.flatnonzero(searched)
        # The query's own stream (the one that drew only brands before), so every other event is unchanged.
        qrng = np.random.default_rng([self.seed, d, 3])
        branded = qrng.random(len(q)) < P_QUERY_BRAND
        shown = self._search_results(w, by_sub, item[q], branded, 1.0 - qrng.random(len(q)))
        sess = np.concatenate([si, si[q]])
        items = np.concatenate([item, shown])
        actions = np.concatenate([action, np.full(len(q), SEARCH)])
        times = np.concatenate([ts, ts[q] - SEARCH_LEAD_MS])
        surfaces = np.concatenate([surface, np.full(len(q), SEARCH_PAGE)])
        order = np.concatenate([2 * idx + 1, 2 * q])  # a search just before the event it opens
        o = np.lexsort((order, sess))
        seq = np.empty(len(sess), np.int64)
        sizes = np.bincount(sess, minlength=n)
        seq[o] = np.arange(len(sess)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        o = np.lexsort((seq, sess, times))
        led_to = np.concatenate([np.full(m, -1), item[q]])
        is_branded = np.concatenate([np.zeros(m, bool), branded])
        return _SearchEvents(sess[o], items[o], actions[o], times[o], surfaces[o], seq[o], led_to[o],
                             is_branded[o])

    def _search_results(self, w: np.ndarray, by_sub: _GroupSampler, target: np.ndarray, branded: np.ndarray,
                        u: np.ndarray) -> np.ndarray:
        """The top result a search shows, one per search: an item of the leaf of the item it leads to (`target`),
        and of that item's brand when the query names it, drawn by the day's weights `w` (popularity and
        trends; `u` uniform in (0, 1]). Never the target by construction, only by its weight: a branded query
        whose leaf has no other item of that brand with weight shows the target (or, if the target has no
        weight either, a result of the whole leaf)."""
        shown = by_sub.sample(self.item_sub[target], u)
        if not branded.any():
            return shown
        n_brands = int(self.item_brand_code.max()) + 1
        key = self.item_sub * n_brands + self.item_brand_code
        live = np.flatnonzero(w > 0)
        groups, inv = np.unique(key[live], return_inverse=True)
        by_brand = _GroupSampler(inv, w[live], len(groups))
        b = np.flatnonzero(branded)
        want = key[target[b]]
        j = np.minimum(np.searchsorted(groups, want), len(groups) - 1)
        found = groups[j] == want
        shown[b[found]] = live[by_brand.sample(j[found], u[b[found]])]
        return shown

    def _queries(self, d: int, ev: _Events, intent_sub: np.ndarray) -> pa.Array:
        """A search's query: the subcategory name of the item it led to, with that item's brand before it when
        the generator drew a branded query (`_SearchEvents.branded`); null for other events."""
        assert isinstance(ev, _SearchEvents)
        text: list[str | None] = [None] * len(ev.action)
        for r in np.flatnonzero(ev.action == SEARCH):
            name = self.subcategories[self.item_sub[ev.led_to[r]]].replace("_", " ")
            text[r] = f"{self.item_brand[ev.led_to[r]].lower()} {name}" if ev.branded[r] else name
        return pa.array(text, pa.string())

"""A tiny seeded shop for the training tests: sessions with a known intent category, as stored events."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from insession.schema import EVENT_ARROW_SCHEMA

T0 = 1_700_000_000_000  # 2023-11-14
MINUTE = 60_000
DAY = 86_400_000


def item_category(item: int, n_subcats: int = 2, per_subcat: int = 8) -> tuple[str, str]:
    sub = item // per_subcat
    return f"c{sub // n_subcats}", f"s{sub}"


def make_shop(
    n_users: int = 40, sessions_per_user: int = 6, n_cats: int = 4, seed: int = 0, session_ids: bool = True
) -> tuple[pa.Table, dict[str, str]]:
    """Events (EVENT_ARROW_SCHEMA, offsets in time order) and each session's intent category by session id
    (`<user>-s<k>`, also the events' session_id unless session_ids=False).

    In a session the shopper mostly views items of the intent category (some noise) and adds one or two
    items of it to the cart (most of them viewed just before), sometimes viewing
    more afterwards. Items are `i<k>` in categories `c<j>`.
    """
    rng = np.random.default_rng(seed)
    per_cat = 16
    n_items = n_cats * per_cat
    rows: list[tuple[str, str, str, int, str | None, str, str]] = []
    intents: dict[str, str] = {}
    for u in range(n_users):
        user = f"u{u}"
        fav = rng.integers(n_cats)
        t = T0 + int(rng.integers(0, DAY))
        for s in range(sessions_per_user):
            cat = int(fav if rng.random() < 0.5 else rng.integers(n_cats))
            intents[f"{user}-s{s}"] = f"c{cat}"
            sid = f"{user}-s{s}" if session_ids else None
            pool = np.arange(cat * per_cat, (cat + 1) * per_cat)
            n_views = int(rng.integers(4, 10))
            carts = set(rng.choice(pool, size=int(rng.integers(1, 3)), replace=False).tolist())
            seq: list[tuple[int, str]] = []
            for _ in range(n_views):
                item = int(rng.choice(pool)) if rng.random() < 0.8 else int(rng.integers(n_items))
                seq.append((item, "view"))
            for c in carts:
                pos = int(rng.integers(1, len(seq) + 1))
                seq.insert(pos, (c, "add_to_cart"))
                if rng.random() < 0.9:  # most carts follow a product view; some come straight from a listing
                    seq.insert(pos, (c, "view"))
            for item, action in seq:
                t += int(rng.integers(10_000, 4 * MINUTE))
                category, sub = item_category(item)
                rows.append((user, f"i{item}", action, t, sid, category, sub))
            t += int(rng.integers(2, 30)) * 3_600_000  # the next session starts hours later
    rows.sort(key=lambda r: r[3])
    cols = list(zip(*rows, strict=True))
    n = len(rows)
    table = pa.table(
        {
            "offset": pa.array(np.arange(n), pa.int64()),
            "user_id": pa.array(cols[0], pa.string()),
            "item_id": pa.array(cols[1], pa.string()),
            "action": pa.array(cols[2], pa.string()),
            "ts": pa.array(cols[3], pa.int64()),
            "event_id": pa.nulls(n, pa.string()),
            "session_id": pa.array(cols[4], pa.string()),
            "surface": pa.nulls(n, pa.string()),
            "properties": pa.nulls(n, pa.string()),
            "category": pa.array(cols[5], pa.string()),
            "subcategory": pa.array(cols[6], pa.string()),
            "ingest_ts": pa.array(cols[3], pa.int64()),
            "brand": pa.nulls(n, pa.string()),
            "price": pa.nulls(n, pa.float64()),
            "price_band": pa.nulls(n, pa.string()),
        },
        schema=EVENT_ARROW_SCHEMA,
    )
    return table, intents

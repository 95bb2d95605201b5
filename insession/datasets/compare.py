"""Real vs synthetic, side by side: `insession generate --compare taobao_userbehavior_head84k`.

The first sample sizes the synthetic shops (its shoppers, days and event count; a catalogue
`CATALOGUE_PER_EVENT` times the event count, since the Taobao sample sees 55k distinct items in 84k events,
a slice of a catalogue of millions); each is measured by `stats.measure`. The table shows the realistic
shop against the targets and tolerances its tests hold it to (`TARGETS`), and the old default shop
beside it. Further samples (REES46) add a column, measured alike.
"""

from __future__ import annotations

import math
from pathlib import Path

from insession.datasets.stats import ShopStats, measure, real_events, shop_events
from insession.datasets.synthetic import generate_shop

CATALOGUE_PER_EVENT = 2.4
# Statistic -> (target, absolute tolerance). Targets: `measure` on taobao_userbehavior_head84k (2026-11-29);
# tests/datasets/test_realistic.py holds the seeded realistic shop sized like it within the tolerances.
TARGETS: dict[str, tuple[float, float]] = {
    "share_add_to_cart": (0.0533, 0.01),
    "share_favorite": (0.0279, 0.01),
    "share_purchase": (0.0207, 0.008),
    "session_len_p50": (3.0, 1.0),
    "session_len_p75": (7.0, 1.5),
    "session_len_p90": (15.0, 3.0),
    "session_len_mean": (5.99, 0.8),
    "sessions_per_user_day": (1.922, 0.25),
    "cart_viewed_in_session": (0.0909, 0.03),
    "cart_viewed_in_history": (0.0683, 0.03),
    "cart_never_viewed": (0.8408, 0.05),
    "cart_last_view": (0.0056, 0.015),
    "cart_category_in_session": (0.5019, 0.08),
    "session_recency_ndcg10": (0.0503, 0.03),
    "repeat_purchase_item": (0.0229, 0.015),
    "repeat_purchase_category": (0.0457, 0.02),
    "repeat_cart_item": (0.0240, 0.015),
    "category_switch_rate": (0.5335, 0.05),
    "sessions_multi_category": (0.7885, 0.05),
    "top1pct_share": (0.0696, 0.025),
    "top10pct_share": (0.2996, 0.06),
    "gini_items": (0.2891, 0.06),
    "singleton_items": (0.7386, 0.10),
    "top100_overlap_daily": (0.0543, 0.05),
    "hour_share_00_04": (0.1633, 0.03),
    "hour_share_04_08": (0.1967, 0.03),
    "hour_share_08_12": (0.2146, 0.03),
    "hour_share_12_16": (0.3068, 0.03),
    "hour_share_16_20": (0.0634, 0.03),
    "hour_share_20_24": (0.0552, 0.03),
    "dow_rate_sat": (1.173, 0.15),
    "dow_rate_sun": (1.111, 0.15),
}


def sized_like(real: ShopStats, seed: int, realistic: bool) -> ShopStats:
    """A seeded synthetic shop with the real sample's shoppers, days and events, measured."""
    v = real.values
    events = int(v["events"])
    shop = generate_shop(int(v["users"]), int(CATALOGUE_PER_EVENT * events), max(1, round(v["days"])), seed,
                         target_events=events, realistic=realistic)
    return measure(shop_events(shop), "realistic synthetic" if realistic else "old synthetic")


def off_target(stats: ShopStats) -> list[str]:
    """The statistics outside their tolerance of `TARGETS`, each as 'name: value (target +- tol)'."""
    return [f"{k}: {stats.values[k]:.4f} ({t} +- {tol})" for k, (t, tol) in TARGETS.items()
            if not abs(stats.values[k] - t) <= tol]


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "—"
    return f"{x:,.0f}" if abs(x) >= 100 or x == int(x) else f"{x:.3f}"


def comparison(samples: list[str], data: Path, seed: int = 7) -> str:
    """The side-by-side table as markdown: the samples (the first sizes the shops), the realistic shop with
    its target and whether it is within tolerance, and the old default shop."""
    if not samples:
        raise ValueError("compare: name at least one sample under --data (e.g. taobao_userbehavior_head84k)")
    real = [measure(real_events(data / f"{name}.parquet"), name) for name in samples]
    realistic, old = sized_like(real[0], seed, True), sized_like(real[0], seed, False)
    head = ["statistic", f"{real[0].name} (real)", "realistic synthetic", "target ± tolerance", "within",
            "old synthetic", *[f"{r.name} (real)" for r in real[1:]]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in real[0].values:
        target = TARGETS.get(key)
        within = "" if target is None else ("yes" if abs(realistic.values[key] - target[0]) <= target[1] else "NO")
        cells = [f"`{key}`", _fmt(real[0].values[key]), _fmt(realistic.values[key]),
                 "" if target is None else f"{_fmt(target[0])} ± {target[1]}", within, _fmt(old.values[key]),
                 *[_fmt(r.values[key]) for r in real[1:]]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

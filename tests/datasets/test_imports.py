"""Importers on tiny handmade files in the published raw formats, and on the real normalised sample."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from insession.datasets import Imported, read
from insession.schema import validate_events, validate_items

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the checkout


def _write(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def _valid(items: list[dict], events: list[dict]) -> None:
    validate_items(items, now_ms=0)
    validate_events(events, now_ms=max(e["ts"] for e in events) + 1)
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)


TAOBAO = """
1,100,10,pv,1511544070
1,101,10,cart,1511544080
1,100,11,buy,1511544300
this,is,broken
2,102,12,pv,not-a-time
2,103,12,pv,1511544000
2,104,13,unknown,1511544100
2,105,13,fav,1511544200
3,106,14,pv,0
"""


def test_taobao(tmp_path):
    path = _write(tmp_path / "UserBehavior.csv", TAOBAO)
    with Imported("taobao", path) as imp:
        items, events = list(imp.item_rows()), list(imp.events())
        # Skipped: a line with 3 fields, an unparsable time, an unknown behaviour, a 1970 time.
        assert imp.skipped == 4 and imp.n_events == 5
    _valid(items, events)
    assert [(e["user_id"], e["item_id"], e["action"], e["ts"]) for e in events] == [
        ("2", "103", "view", 1511544000000),
        ("1", "100", "view", 1511544070000),
        ("1", "101", "add_to_cart", 1511544080000),
        ("2", "105", "favorite", 1511544200000),
        ("1", "100", "purchase", 1511544300000),
    ]
    assert all("session_id" not in e for e in events)
    assert len({e["event_id"] for e in events}) == 5
    # Flat categories; an item's latest category wins.
    assert items == [
        {"item_id": "100", "category": "11", "subcategory": "11"},
        {"item_id": "101", "category": "10", "subcategory": "10"},
        {"item_id": "103", "category": "12", "subcategory": "12"},
        {"item_id": "105", "category": "13", "subcategory": "13"},
    ]


def test_taobao_limit_takes_the_first_valid_rows_of_the_file(tmp_path):
    path = _write(tmp_path / "UserBehavior.csv", TAOBAO)
    items, events = read("taobao", tmp_path, limit=4)  # a directory holding UserBehavior.csv works too
    events = list(events)
    assert [(e["user_id"], e["item_id"]) for e in events] == [("2", "103"), ("1", "100"), ("1", "101"),
                                                              ("1", "100")]
    assert {i["item_id"] for i in items} == {"100", "101", "103"}
    assert path.exists()


def test_retailrocket(tmp_path):
    _write(tmp_path / "events.csv", """
timestamp,visitorid,event,itemid,transactionid
1433221332117,257597,view,355908,
1433224214164,992329,view,248676,
1433221999827,111016,addtocart,355908,
1433222000000,111016,transaction,355908,4000
broken,line
1433223000000,5,click,248676,
1433221000000,7,view,999999,
""")
    _write(tmp_path / "category_tree.csv", """
categoryid,parentid
1016,213
213,1
1,
809,1
""")
    _write(tmp_path / "item_properties_part1.csv", """
timestamp,itemid,property,value
1433041200000,355908,categoryid,809
1433041200000,355908,available,1
1433141200000,355908,categoryid,1016
1433041200000,248676,categoryid,213
1433041200000,248676,790,n5000.000
""")
    _write(tmp_path / "item_properties_part2.csv", """
timestamp,itemid,property,value
1433241200000,248676,available,0
1433041200000,123,categoryid,4242
""")
    with Imported("retailrocket", tmp_path) as imp:
        items, events = list(imp.item_rows()), list(imp.events())
        assert imp.skipped == 2  # the two-field line and the unknown 'click'
    _valid(items, events)
    assert [(e["user_id"], e["item_id"], e["action"]) for e in events] == [
        ("7", "999999", "view"),  # kept although the item has no properties
        ("257597", "355908", "view"),
        ("111016", "355908", "add_to_cart"),
        ("111016", "355908", "purchase"),
        ("992329", "248676", "view"),
    ]
    # Leaf category = subcategory (latest value wins), top-level ancestor = category.
    assert items == [
        {"item_id": "123", "category": "4242", "subcategory": "4242"},
        {"item_id": "248676", "category": "1", "subcategory": "213", "available": False},
        {"item_id": "355908", "category": "1", "subcategory": "1016", "available": True},
    ]


REES46_ROWS = [
    # user_id, session_id, item_id, category_id, category_path, l1..l4, brand, price, action, ts_seconds
    ["541", "sa", "44600062", "2103807459595387724", "", "", "", "", "", "shiseido", "35.79", "view",
     "1569888000"],
    ["554", "sb", "3900821", "2053013552326770905", "appliances.environment.water_heater", "appliances",
     "environment", "water_heater", "", "aqua", "33.2", "view", "1569888001"],
    ["554", "sb", "3900821", "2053013552326770905", "appliances.environment.water_heater", "appliances",
     "environment", "water_heater", "", "aqua", "31.0", "add_to_cart", "1569888090"],
    ["554", "sb", "3900821", "2053013552326770905", "appliances.environment.water_heater", "appliances",
     "environment", "water_heater", "", "aqua", "31.0", "click", "1569888095"],
    ["519", "sc", "17200506", "2053013559792632471", "furniture.living_room.sofa", "furniture", "living_room",
     "sofa", "", "", "543.1", "purchase", "1569888002"],
]


def test_normalised_csv_gz_with_a_category_chain(tmp_path):
    path = tmp_path / "rees46_sample.csv.gz"
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "session_id", "item_id", "category_id", "category_path", "category_l1",
                    "category_l2", "category_l3", "category_l4", "brand", "price", "action", "ts_seconds"])
        w.writerows(REES46_ROWS)
        f.write("1,2,3\n")  # malformed: too few fields
    with Imported("normalised", path) as imp:
        items, events = list(imp.item_rows()), list(imp.events())
        assert imp.skipped == 2  # the short line and the unknown action
    _valid(items, events)
    assert [(e["session_id"], e["action"], e["ts"]) for e in events] == [
        ("sa", "view", 1569888000000), ("sb", "view", 1569888001000), ("sc", "purchase", 1569888002000),
        ("sb", "add_to_cart", 1569888090000)]
    assert events[0]["event_id"] == "rees46_sample-0"
    assert items == [
        {"item_id": "17200506", "category": "furniture", "subcategory": "furniture.living_room.sofa",
         "price": 543.1},
        {"item_id": "3900821", "category": "appliances", "subcategory": "appliances.environment.water_heater",
         "price": 31.0, "brand": "aqua"},
        {"item_id": "44600062", "category": "2103807459595387724", "subcategory": "2103807459595387724",
         "price": 35.79, "brand": "shiseido"},
    ]


def test_normalised_parquet_with_flat_categories(tmp_path):
    path = tmp_path / "flat.parquet"
    pq.write_table(pa.table({
        "user_id": [1, 1, 2], "session_id": ["1_1", "1_1", "2_1"], "item_id": [10, 11, 10],
        "category_id": [7, 8, 7], "category_path": ["7", "8", "7"], "action": ["view", "view", "purchase"],
        "ts_seconds": [1511544070, 1511544000, 1511544100],
    }), path)
    items, events = read("normalised", path)
    items, events = list(items), list(events)
    _valid(items, events)
    assert [(e["item_id"], e["ts"]) for e in events] == [("11", 1511544000000), ("10", 1511544070000),
                                                         ("10", 1511544100000)]
    assert items == [{"item_id": "10", "category": "7", "subcategory": "7"},
                     {"item_id": "11", "category": "8", "subcategory": "8"}]


def test_unknown_source_and_missing_columns(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        Imported("diginetica", tmp_path)
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user_id": [1]}), path)
    with pytest.raises(ValueError, match="missing columns"):
        Imported("normalised", path)
    _write(tmp_path / "events.csv", "time,visitor,event\n1,2,view")
    with pytest.raises(ValueError, match="missing columns"):
        Imported("retailrocket", tmp_path)


@pytest.mark.skipif(not (SHARED / "taobao_userbehavior_head84k.parquet").exists(), reason="no shared sample")
def test_real_taobao_sample():
    stats = {s["dataset"]: s for s in json.loads((SHARED / "stats.json").read_text())}
    want = stats["taobao_userbehavior_head84k"]
    with Imported("normalised", SHARED / "taobao_userbehavior_head84k.parquet") as imp:
        items = list(imp.item_rows())
        events = list(imp.events())
        assert imp.skipped == 0
    assert len(events) == want["rows"] and len(items) == want["items"]
    assert len({e["user_id"] for e in events}) == want["users"]
    assert len({e["session_id"] for e in events}) == want["sessions"]
    actions: dict[str, int] = {}
    for e in events:
        actions[e["action"]] = actions.get(e["action"], 0) + 1
    assert actions == want["actions"]
    assert len({i["category"] for i in items}) <= want["categories"]
    assert all(i["category"] == i["subcategory"] for i in items)
    now = events[-1]["ts"] + 1
    for k in range(0, len(events), 10_000):
        validate_events(events[k:k + 10_000], now_ms=now)
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)

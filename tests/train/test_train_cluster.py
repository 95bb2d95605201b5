"""`insession training-data --log`: training examples built from a replicated log (three real NATS servers on
loopback) equal those built from the same events in one Parquet file, when part of the stream is in a node's
exported history and the rest only in the stream."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from train_shop import make_shop
from typer.testing import CliRunner

from insession.cli import app
from insession.log import LogConfig
from insession.log.cluster import LocalCluster
from insession.log.export import events_from_arrow
from insession.log.jetstream import JetStreamLog


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster.on_free_ports(tmp_path_factory.mktemp("nats"))
    c.start()
    yield c
    c.stop()


def test_training_data_from_history_plus_stream_equals_training_data_from_the_events(cluster: LocalCluster,
                                                                                    tmp_path: Path) -> None:
    shop = make_shop(n_users=24, seed=3)[0]
    events = events_from_arrow(shop)
    cfg = LogConfig(url=",".join(cluster.urls), monitor=",".join(cluster.monitor_urls),
                    stream=f"T{uuid.uuid4().hex[:12]}")
    node = tmp_path / "node"
    with JetStreamLog(cfg, node, partitions=4) as log:
        for i in range(0, len(events), 1000):
            log.append(events[i:i + 1000])
        half = len(events) // 2
        assert log.export(node / "history", upto_offset=half) == half  # the rest stays in the stream only
    whole = tmp_path / "events.parquet"
    pq.write_table(shop, whole)
    runner = CliRunner()
    common = ["--no-served-negatives", "--seed", "1"]
    got = runner.invoke(app, ["training-data", str(node), "--out", str(tmp_path / "a"), "--log", cfg.url,
                              "--stream", cfg.stream, *common])
    assert got.exit_code == 0, got.output
    assert f"{len(events):,} events: {half + 1:,} from the history" in got.output
    want = runner.invoke(app, ["training-data", str(whole), "--out", str(tmp_path / "b"), *common])
    assert want.exit_code == 0, want.output
    for name in ("train", "val", "train_requests", "val_requests"):
        a, b = pq.read_table(tmp_path / "a" / f"{name}.parquet"), pq.read_table(tmp_path / "b" / f"{name}.parquet")
        assert a.num_rows > 0 and a.equals(b), name

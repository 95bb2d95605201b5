"""Hot reload: atomic swaps under concurrent requests; refusal of an artefact trained on other features."""

from __future__ import annotations

import threading

import pytest

from insession.rank import ArtefactRefused, RankConfig, Ranker, RankRequest

from .shop import Shop

CANDS = ["i1", "i3", "i16", "i17", "i20", "i33", "i40", "i48", "i60"]


def ranking(resp: object) -> list[tuple[str, float]]:
    return [(it.item_id, round(it.score, 5)) for it in resp.items]  # type: ignore[attr-defined]


def test_reload_swaps_under_concurrent_requests_without_a_failed_request(shop: Shop, ranker: Ranker) -> None:
    versions = {"v1": ranker.model.path}  # type: ignore[union-attr]
    for n in (2, 3):
        versions[f"v{n}"] = str(shop.artefact(f"v{n}", seed=n))
    # what each version answers, request by request, when nothing else is going on
    expected = {}
    for v, path in versions.items():
        ranker.reload(path)
        expected[v] = ranking(ranker.rank(RankRequest("u0", candidates=CANDS, k=8)))
    assert len({tuple(r) for r in expected.values()}) == 3  # the versions really rank differently
    ranker.reload(versions["v1"])

    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[tuple[str | None, str | None, list[tuple[str, float]]]] = []

    def client() -> None:
        while not stop.is_set():
            try:
                r = ranker.rank(RankRequest("u0", candidates=CANDS, k=8))
                seen.append((r.model_version, r.fallback, ranking(r)))
            except BaseException as e:  # any exception is a failed request
                errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(3):
        for v in ("v2", "v3", "v1"):
            ranker.reload(versions[v])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len({v for v, _, _ in seen}) >= 2  # requests really ran across swaps
    for version, fallback, got in seen:
        assert fallback is None and version in expected
        assert got == expected[version]  # each request ran whole on the one model it started with


def test_reload_without_path_takes_the_newest_version(shop: Shop, ranker: Ranker) -> None:
    assert ranker.model is not None and ranker.model.version == "v1"
    shop.artefact("v2", seed=2)
    info = ranker.reload()
    assert info.version == "v2" and ranker.model.version == "v2"
    assert info.feature_hash == shop.features.registry.hash() and info.metrics == {"seed": 2}


def test_mismatched_artefact_is_refused_and_the_serving_model_stays(shop: Shop, ranker: Ranker) -> None:
    bad = shop.artefact("v9", seed=9, feature_hash="0123456789abcdef")
    with pytest.raises(ArtefactRefused, match="0123456789abcdef.*running feature set") as e:
        ranker.reload(bad)
    assert shop.features.registry.hash() in str(e.value)
    assert ranker.model is not None and ranker.model.version == "v1"
    assert ranker.last_reload_error is not None and "0123456789abcdef" in ranker.last_reload_error
    resp = ranker.rank(RankRequest("u0", candidates=CANDS))
    assert resp.model_version == "v1" and resp.fallback is None


def test_a_mismatched_newest_artefact_at_start_leaves_the_service_answering(shop: Shop) -> None:
    shop.artefact("v9", seed=9, feature_hash="0123456789abcdef")
    r = Ranker(shop.features, shop.catalog, shop.model_dir, RankConfig())
    try:
        assert r.model is None and "0123456789abcdef" in (r.last_reload_error or "")
        resp = r.rank(RankRequest("u0", k=5))
        assert (resp.fallback_reason, resp.model_version) == ("no_model", None) and len(resp.items) == 5
    finally:
        r.close()


def test_a_broken_or_mismatched_newest_version_leaves_the_newest_valid_one_serving(shop: Shop) -> None:
    shop.artefact("v1", seed=1)
    shop.artefact("v2", seed=2)
    shop.artefact("v8", seed=8, feature_hash="0123456789abcdef")
    (shop.artefact("v9", seed=9) / "model.pt").write_bytes(b"garbage, not weights")
    r = Ranker(shop.features, shop.catalog, shop.model_dir, RankConfig(budget_ms=5_000, backend="torch"))
    try:
        assert r.model is not None and r.model.version == "v2"
        assert set(r.model.skipped) == {"v8", "v9"}
        assert "0123456789abcdef" in r.model.skipped["v8"] and "cannot be loaded" in r.model.skipped["v9"]
        assert str(shop.model_dir) not in repr(r.model.skipped)  # versions are named, not where they live
        resp = r.rank(RankRequest("u0", candidates=CANDS, k=3))
        assert resp.fallback is None and resp.model_version == "v2"
    finally:
        r.close()


def test_missing_artefact(shop: Shop, ranker: Ranker) -> None:
    with pytest.raises(FileNotFoundError):
        ranker.reload(shop.model_dir / "nope")
    assert ranker.model is not None and ranker.model.version == "v1"


def test_an_artefact_this_code_cannot_load_is_refused_not_fatal(shop: Shop, ranker: Ranker) -> None:
    broken = shop.artefact("v5", seed=5)
    (broken / "model.pt").write_bytes(b"not a state dict")
    with pytest.raises(ArtefactRefused, match="cannot be loaded"):
        ranker.reload(broken)
    assert ranker.model is not None and ranker.model.version == "v1"
    r = Ranker(shop.features, shop.catalog, shop.model_dir / "v5", RankConfig(backend="torch"))  # v5 alone
    try:
        assert r.model is None and "cannot be loaded" in (r.last_reload_error or "")
        assert r.rank(RankRequest("u0", k=3)).fallback_reason == "no_model"
    finally:
        r.close()


def test_a_service_starts_with_its_model_warm_on_the_final_backend(shop: Shop) -> None:
    """The first request after start used to share the cores with the ONNX export and time out."""
    shop.artefact("v1", seed=1)
    r = Ranker(shop.features, shop.catalog, shop.model_dir, RankConfig(budget_ms=5_000))
    try:
        assert r.model is not None and r.model.backend == "onnx"  # exported before the constructor returned
        first = r.rank(RankRequest("u0", candidates=CANDS, k=3))
        assert first.fallback is None and first.model_version == "v1"
    finally:
        r.close()

import threading

import numpy as np
import pytest

from pipeline import index, release
from pipeline.storage import LocalStore


def test_flat_index_round_trips_and_matches_exact_search():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 16)).astype(np.float32)
    idx = index.deserialize(index.serialize(index.build_index(vectors)))
    assert idx.ntotal == 500
    q = vectors[:5]
    _, got = idx.search(q, 10)
    exact = np.argsort(-(q @ vectors.T), axis=1)[:, :10]
    assert np.array_equal(got, exact)
    assert index.self_check(idx, vectors) == 1.0


def _files(tag: bytes) -> dict[str, bytes]:
    return {name: tag + name.encode() for name in release.FILES}


def test_release_ids_are_content_addressed_and_immutable(tmp_path):
    store = LocalStore(tmp_path)
    files = _files(b"a")
    rid = release.release_id_for("20260101T000000Z", files)
    assert rid == release.release_id_for("20260101T000000Z", dict(reversed(list(files.items()))))
    assert rid != release.release_id_for("20260101T000000Z", _files(b"b"))
    assert release.write_release(store, "acme", rid, files, {"x": 1}) is True
    assert release.write_release(store, "acme", rid, files, {"x": 1}) is False  # same bytes: no-op
    with pytest.raises(release.ReleaseError, match="immutable"):
        release.write_release(store, "acme", rid, _files(b"b"), {"x": 1})
    manifest = release.read_manifest(store, "acme", rid)
    assert manifest["files"]["items.faiss"]["sha256"] == release.sha256(files["items.faiss"])
    with pytest.raises(release.ReleaseError, match="no manifest"):
        release.read_manifest(store, "acme", "missing")


def test_pointer_moves_forward_only_and_records_previous(tmp_path):
    store = LocalStore(tmp_path)
    p = lambda rid, end: release.Pointer(rid, end)  # noqa: E731
    assert release.flip_pointer(store, "acme", p("r2", "2026-01-02T00:00:00+00:00"))[0]
    moved, why = release.flip_pointer(store, "acme", p("r1", "2026-01-01T00:00:00+00:00"))
    assert not moved and "not moved backwards" in why
    assert release.flip_pointer(store, "acme", p("r3", "2026-01-03T00:00:00+00:00"))[0]
    doc, _ = release.read_pointer(store, "acme")
    assert doc["release_id"] == "r3" and doc["previous_release_id"] == "r2"
    # rollback is explicit
    assert release.flip_pointer(store, "acme", p("r1", "2026-01-01T00:00:00+00:00"), allow_backwards=True)[0]


def test_concurrent_publishers_exactly_one_pointer_wins(tmp_path):
    store = LocalStore(tmp_path)
    release.flip_pointer(store, "acme", release.Pointer("r0", "2026-01-01T00:00:00+00:00"))
    barrier = threading.Barrier(6)
    outcomes: list[tuple[bool, str]] = []

    def publisher(n: int) -> None:
        barrier.wait()
        outcomes.append(release.try_flip(store, "acme", release.Pointer(f"r{n}", "2026-01-02T00:00:00+00:00")))

    # serialise the read-then-write window so every publisher reads the same etag
    original = store.get_with_etag
    reads = threading.Barrier(6)
    local = threading.local()

    def slow_read(key):
        got = original(key)
        if not getattr(local, "waited", False):  # only the publisher's first read, not put_if's re-check
            local.waited = True
            reads.wait(timeout=10)
        return got

    store.get_with_etag = slow_read  # type: ignore[method-assign]
    threads = [threading.Thread(target=publisher, args=(n,)) for n in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.get_with_etag = original  # type: ignore[method-assign]
    winners = [o for o in outcomes if o[0]]
    assert len(winners) == 1 and sum("another publisher" in o[1] for o in outcomes) == 5
    assert release.read_pointer(store, "acme")[0]["previous_release_id"] == "r0"

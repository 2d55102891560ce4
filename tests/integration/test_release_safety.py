"""A broken, half-written or hostile release is never served.

Real services only: S3 is moto's HTTP server (boto3 talks to it over a socket, multipart
uploads included), Redis is the server on 127.0.0.1 (db 12, a unique key prefix, deleted
afterwards). Releases are small but built with the real writers (safetensors, npy, parquet,
a FAISS index) and read back with the real `load_release` / `ReleaseCache`.

1. a publish killed mid-upload (SIGKILL of a child process inside a multipart upload, and a
   store that dies after N puts) leaves the old release live and the new one unloadable;
   rerunning the publish finishes it and flips the pointer;
2. one flipped byte in any release file (or the manifest) is refused, and serving keeps the
   release it has until a good one is published;
3. two publishers racing to flip the pointer: exactly one wins, the loser is told cleanly,
   and the pointer never moves to an older data interval;
4. pickle payloads planted in S3 (as .npy files with valid checksums) or in Redis (as user
   vector / seen keys) are never unpickled.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import numpy as np
import pytest

from pipeline.index import build as faiss_index
from pipeline.index import search as ann
from pipeline.release import format as rel
from pipeline.serving.releases import ReleaseCache
from pipeline.serving.user_store import RedisStore, key
from pipeline.storage import LocalStore, paths

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TENANT = "acme"
DIM = 64  # 256-byte user vectors: room for a pickle payload of exactly one vector's length


def day(n: int) -> str:
    return f"2025-04-{n:02d}T00:00:00+00:00"


# --------------------------------------------------------------------------- release builder


def make_files(
    seed: int,
    n_users: int = 40,
    n_items: int = 30,
    dim: int = DIM,
    *,
    seen: tuple[int, int] = (0, 6),
    model_meta: dict | None = None,
    popular_items: int = 10,
) -> dict[str, bytes]:
    """Every file of `pipeline.release.format.FILES`, through the same assembly as publish;
    `seen` bounds each user's seen-list length (numpy's integers: low inclusive, high exclusive)."""
    rng = np.random.default_rng(seed)
    user_vectors = rng.standard_normal((n_users, dim)).astype(np.float32)
    item_vectors = rng.standard_normal((n_items, dim)).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(rng.integers(*seen, n_users))]).astype(np.int64)
    return rel.files_from_vectors(
        [f"u{i}" for i in range(n_users)],
        [f"i{j}" for j in range(n_items)],
        user_vectors,
        item_vectors,
        indptr,
        rng.integers(0, n_items, int(indptr[-1])).astype(np.int32),
        index_bytes=ann.serialize(faiss_index.build_index(item_vectors)[0]),
        model_meta=model_meta or {"kind": "test", "seed": seed},
        popular_items=popular_items,
    )


def manifest_for(run_id: str, interval_end: str) -> dict[str, str]:
    return {"run_id": run_id, "data_interval_end": interval_end}


def write(store, files: dict[str, bytes], run_id: str, interval_end: str) -> str:
    """Write a release (files, then manifest) without touching the pointer; returns its id."""
    rid = rel.release_id_for(run_id, files)
    rel.write_release(store, TENANT, rid, files, manifest_for(run_id, interval_end))
    return rid


def pointer_for(rid: str, interval_end: str) -> rel.Pointer:
    return rel.Pointer(release_id=rid, data_interval_end=interval_end)


def publish(store, files: dict[str, bytes], run_id: str, interval_end: str) -> tuple[str, rel.Flip]:
    """The release, then one conditional flip of the pointer: `publish_release` without the
    publish stage's retry, so a race's loser is seen as the loser."""
    out = rel.publish_release(store, TENANT, files, manifest_for(run_id, interval_end), retries=0)
    return out.release_id, out.flip


def live_id(store) -> str | None:
    got = rel.read_pointer(store, TENANT)
    return got[0]["release_id"] if got else None


def release_key(rid: str, name: str) -> str:
    return paths.release_key(TENANT, rid, name)


def flip_byte(store, k: str, pos: int | None = None) -> bytes:
    """Flip one bit of one byte of a stored object in place; returns the original bytes."""
    original = store.get(k)
    data = bytearray(original)
    data[len(data) // 2 if pos is None else pos] ^= 0x01
    store.put(k, bytes(data))
    return original


# --------------------------------------------------------------------------- stores


@pytest.fixture
def redis12():
    """(client, prefix) on the real Redis server, db 12, a unique prefix; all its keys deleted afterwards."""
    import redis

    from tests.conftest import REDIS_URL

    url = urlunparse(urlparse(REDIS_URL)._replace(path="/12"))
    client = redis.Redis.from_url(url, decode_responses=False)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {url}: start it (.ci/run does)")
    prefix = f"relsafety-{uuid.uuid4().hex[:12]}"
    yield client, prefix
    for k in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(k)
    client.close()


# --------------------------------------------------------------------------- 1. killed publish


class DyingStore:
    """A real store whose process 'dies' (raises) on the put after `survive` successful ones."""

    def __init__(self, inner, survive: int) -> None:
        self.inner, self.survive, self.puts = inner, survive, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, k: str, data: bytes) -> None:
        if len(self.puts) >= self.survive:
            raise ConnectionError(f"publisher died before writing {k}")
        self.inner.put(k, data)
        self.puts.append(k)


def assert_half_written_is_never_served(store, cache: ReleaseCache, old: str, half: str) -> None:
    assert live_id(store) == old
    assert cache.get(TENANT).release_id == old
    assert not store.exists(release_key(half, rel.MANIFEST))
    with pytest.raises(rel.ReleaseError, match="no manifest"):
        rel.load_release(store, TENANT, half)
    assert half not in rel.list_releases(store, TENANT)


def test_publish_dying_after_some_puts_leaves_old_release_live(store):
    old, flip = publish(store, make_files(1), "run-1", day(1))
    assert flip.moved
    cache = ReleaseCache(store, None, poll_seconds=0)
    assert cache.get(TENANT).release_id == old

    files = make_files(2)
    dying = DyingStore(store, survive=4)
    with pytest.raises(ConnectionError, match="publisher died"):
        publish(dying, files, "run-2", day(2))
    half = rel.release_id_for("run-2", files)
    assert len(dying.puts) == 4 and all(k.startswith(release_key(half, "")) for k in dying.puts)
    assert all(store.exists(k) for k in dying.puts)  # some files of the new release are there...
    assert_half_written_is_never_served(store, cache, old, half)  # ...and none of it is served

    # even a pointer forced onto the half-written release (a buggy publisher) is not served
    store.put(paths.pointer_key(TENANT), pointer_for(half, day(2)).to_bytes())
    assert cache.get(TENANT).release_id == old
    store.put(paths.pointer_key(TENANT), pointer_for(old, day(1)).to_bytes())

    rid, flip = publish(store, files, "run-2", day(2))  # the rerun finishes the job
    assert rid == half and flip.moved, flip
    assert live_id(store) == half
    assert rel.read_pointer(store, TENANT)[0]["previous_release_id"] == old
    assert cache.get(TENANT).release_id == half


CHILD = r"""
import os, sys, time
import boto3
from pipeline.release import format as rel
from pipeline.storage import s3
from tests.integration.test_release_safety import make_files, publish

s3.MULTIPART_THRESHOLD = 5 * 1024 * 1024  # S3's smallest part: a 12.8 MB file goes up in 3 parts
client = boto3.client("s3")
uploading = [None]
if os.environ.get("HANG_IN_MULTIPART"):
    def hang(**_):  # a part of user_vectors.npy is up, the upload is not complete: stall until killed
        if uploading[0] == "user_vectors.npy":
            print("PART-UPLOADED", flush=True)
            time.sleep(600)
    client.meta.events.register("after-call.s3.UploadPart", hang)
store = s3.S3Store(sys.argv[1], client=client)
real_put = store.put
def put(k, data):
    uploading[0] = k.rsplit("/", 1)[-1]
    print("PUT", uploading[0], len(data), flush=True)
    real_put(k, data)
store.put = put
files = make_files(7, n_users=50_000)  # model.safetensors and user_vectors.npy: 12.8 MB, 3 parts each
print("RELEASE", rel.release_id_for("run-big", files), flush=True)
rid, flip = publish(store, files, "run-big", "2025-04-02T00:00:00+00:00")
print("DONE", rid, flip.moved, flip.reason, flush=True)
"""


def run_child(uri: str, hang: bool) -> tuple[subprocess.Popen, queue.Queue]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HANG_IN_MULTIPART", None)
    if hang:
        env["HANG_IN_MULTIPART"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, uri],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def read_until(lines: queue.Queue, prefix: str, timeout: float = 60) -> list[str]:
    seen = []
    while True:
        line = lines.get(timeout=timeout)
        if line is None:
            raise AssertionError(f"child exited before printing {prefix!r}:\n" + "\n".join(seen))
        seen.append(line)
        if line.startswith(prefix):
            return seen


def test_publish_sigkilled_inside_multipart_upload_is_never_served(s3_store):
    store = s3_store
    old, flip = publish(store, make_files(1), "run-1", day(1))
    assert flip.moved
    cache = ReleaseCache(store, None, poll_seconds=0)
    assert cache.get(TENANT).release_id == old

    proc, lines = run_child(store.root, hang=True)
    try:
        out = read_until(lines, "PART-UPLOADED")
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup handlers, no abort of the upload
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    half = next(line.split()[1] for line in out if line.startswith("RELEASE"))
    started = [line.split()[1] for line in out if line.startswith("PUT")]
    assert started == ["model.safetensors", "model.json", "user_vectors.npy"], out

    # the kill really happened inside a multipart upload of user_vectors.npy...
    uploads = store._s3.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [f"prefix/{release_key(half, 'user_vectors.npy')}"]
    # ...after the first files of the release were written (one of them a completed multipart upload)
    assert store.exists(release_key(half, "model.safetensors")) and store.exists(release_key(half, "model.json"))
    assert not store.exists(release_key(half, "user_vectors.npy"))  # an incomplete multipart is invisible
    assert_half_written_is_never_served(store, cache, old, half)

    proc, lines = run_child(store.root, hang=False)  # rerun the publish: it completes and flips
    try:
        out = read_until(lines, "DONE", timeout=120)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert out[-1].split()[1:3] == [half, "True"], out
    assert live_id(store) == half
    live = cache.get(TENANT)
    assert live.release_id == half and live.release.user_vectors.shape == (50_000, DIM)


# --------------------------------------------------------------------------- 2. flipped bytes


# load_release never reads the model weights (serving needs only vectors, ids and the index):
# a damaged model.safetensors is refused by whoever reads it through read_file, not by serving.
NOT_READ_BY_LOAD_RELEASE = {"model.safetensors"}


@pytest.mark.parametrize("name", rel.FILES)
def test_one_flipped_byte_in_any_file_is_refused(store, name):
    rid = write(store, make_files(3), "run-3", day(3))
    rel.load_release(store, TENANT, rid)  # intact: loads
    original = flip_byte(store, release_key(rid, name))
    manifest = rel.read_manifest(store, TENANT, rid)
    with pytest.raises(rel.ReleaseError, match=f"checksum mismatch on {name}"):
        rel.read_file(store, TENANT, rid, name, manifest)
    if name not in NOT_READ_BY_LOAD_RELEASE:
        with pytest.raises(rel.ReleaseError, match=f"checksum mismatch on {name}"):
            rel.load_release(store, TENANT, rid)
    store.put(release_key(rid, name), original)
    assert rel.read_file(store, TENANT, rid, name, manifest) == original
    assert rel.load_release(store, TENANT, rid).release_id == rid


def flip_at(doc: bytes, pos: int) -> bytes:
    return doc[:pos] + bytes([doc[pos] ^ 0x01]) + doc[pos + 1 :]


MANIFEST_DAMAGE = {  # one flipped byte (or a cut) in the manifest itself, in the places that matter
    "not json": lambda doc: flip_at(doc, 0),  # '{' -> 'z'
    "files key renamed": lambda doc: flip_at(doc, doc.index(b'"files"') + 5),  # "files" -> "filer"
    "one checksum digit": lambda doc: flip_at(doc, doc.index(b'"sha256": "') + 11),
    "sha256 key renamed": lambda doc: flip_at(doc, doc.index(b'"sha256"') + 6),  # -> "sha257"
    "truncated": lambda doc: doc[: len(doc) // 2],
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE)
def test_damaged_manifest_is_refused_and_old_release_kept(store, damage, caplog):
    a, _ = publish(store, make_files(1), "run-1", day(1))
    cache = ReleaseCache(store, None, poll_seconds=0)
    assert cache.get(TENANT).release_id == a
    b = write(store, make_files(2), "run-2", day(2))
    mkey = release_key(b, rel.MANIFEST)
    store.put(mkey, MANIFEST_DAMAGE[damage](store.get(mkey)))
    with pytest.raises(rel.ReleaseError):
        rel.load_release(store, TENANT, b)
    assert rel.flip_pointer(store, TENANT, pointer_for(b, day(2))).moved
    with caplog.at_level(logging.ERROR, logger="pipeline.serving.releases"):
        assert cache.get(TENANT).release_id == a
    assert any(
        r.name == "pipeline.serving.releases" and f"cannot load release {b}" in r.getMessage() for r in caplog.records
    )


def test_cache_keeps_serving_a_when_pointer_moves_to_corrupt_b_then_serves_good_c(store, caplog):
    a, _ = publish(store, make_files(1), "run-1", day(1))
    cache = ReleaseCache(store, None, poll_seconds=0)
    live_a = cache.get(TENANT)
    assert live_a.release_id == a

    b = write(store, make_files(2), "run-2", day(2))
    flip_byte(store, release_key(b, "item_vectors.npy"))  # bit rot / a bad copy, after the manifest
    assert rel.flip_pointer(store, TENANT, pointer_for(b, day(2))).moved and live_id(store) == b
    with pytest.raises(rel.ReleaseError, match="checksum mismatch on item_vectors.npy"):
        rel.load_release(store, TENANT, b)

    caplog.clear()
    reads = []
    get = store.get
    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.ERROR, logger="pipeline.serving.releases"):
        mp.setattr(store, "get", lambda k: reads.append(k) or get(k))
        for _ in range(3):  # the first poll refuses B; later ones remember it (no re-download) and keep A whole
            assert cache.get(TENANT) is live_a
    errors = [r.getMessage() for r in caplog.records if r.name == "pipeline.serving.releases"]
    assert len(errors) == 1 and f"cannot load release {b}" in errors[0] and f"keeping {a}" in errors[0]
    assert reads.count(release_key(b, rel.MANIFEST)) == 1, reads
    rows, _ = live_a.search(live_a.release.user_vectors[:1], 5)  # A still answers
    assert np.asarray(rows).size == 5

    c, flip = publish(store, make_files(3), "run-3", day(3))  # B is replaced by a good C
    assert flip.moved, flip
    assert cache.get(TENANT).release_id == c
    assert cache.loaded() == {TENANT: c}


def test_damaged_pointer_keeps_the_live_release(store):
    a, _ = publish(store, make_files(1), "run-1", day(1))
    cache = ReleaseCache(store, None, poll_seconds=0)
    assert cache.get(TENANT).release_id == a
    flip_byte(store, paths.pointer_key(TENANT), pos=0)  # '{' -> 'z'
    assert cache.get(TENANT).release_id == a


# --------------------------------------------------------------------------- 3. racing publishers


class GatedStore:
    """The real store, but every conditional put first waits on `gate()` (a barrier or an event)."""

    def __init__(self, inner, gate) -> None:
        self.inner, self.gate = inner, gate

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put_if(self, k: str, data: bytes, *, etag: str | None) -> None:
        self.gate()
        self.inner.put_if(k, data, etag=etag)


def race(store, publishers: list[tuple[dict[str, bytes], str, str]]) -> list[tuple[str, bool, str]]:
    """Each publisher writes its release, reads the pointer, then all flip at the same instant."""
    barrier = threading.Barrier(len(publishers))
    results: list = [None] * len(publishers)

    def run(i: int) -> None:
        files, run_id, interval_end = publishers[i]
        gated = GatedStore(store, lambda: barrier.wait(timeout=30))
        try:
            results[i] = publish(gated, files, run_id, interval_end)
        except BaseException as exc:  # surfaced below
            results[i] = exc
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(publishers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for res in results:
        if isinstance(res, BaseException):
            raise res
    return results


@pytest.mark.parametrize("first_publish", [True, False], ids=["over-live-release", "first-ever"])
def test_two_concurrent_publishers_exactly_one_wins(store, first_publish):
    a = publish(store, make_files(1), "run-1", day(1))[0] if first_publish else None
    results = race(store, [(make_files(2), "run-2a", day(2)), (make_files(3), "run-2b", day(2))])
    winners = [r for r in results if r[1].moved]
    losers = [r for r in results if not r[1].moved]
    assert len(winners) == 1 and len(losers) == 1, results
    assert losers[0][1].outcome is rel.FlipOutcome.LOST_RACE, losers[0][1]
    doc = rel.read_pointer(store, TENANT)[0]
    assert doc["release_id"] == winners[0][0]
    assert doc["previous_release_id"] == a  # the winner replaced A, not the loser's write
    for rid, _ in results:  # both releases are complete and loadable; only one is live
        assert rel.load_release(store, TENANT, rid).release_id == rid
    assert ReleaseCache(store, None, poll_seconds=0).get(TENANT).release_id == winners[0][0]


def test_pointer_never_moves_backwards(store):
    publish(store, make_files(1), "run-1", day(1))
    newer, flip = publish(store, make_files(2), "run-3", day(3))
    assert flip.moved
    older, flip = publish(store, make_files(3), "run-2", day(2))  # e.g. a late backfill
    assert flip.outcome is rel.FlipOutcome.OLDER_THAN_LIVE and "not moved backwards" in flip.reason
    assert live_id(store) == newer
    # going back takes an explicit rollback
    assert rel.flip_pointer(store, TENANT, pointer_for(older, day(2)), allow_backwards=True).moved
    assert live_id(store) == older


@pytest.mark.parametrize("held", ["older", "newer"])
def test_publisher_that_read_a_stale_pointer_loses_cleanly(store, held):
    """Publisher H reads the pointer, stalls; the other one flips; H's conditional put then loses.

    A rerun of H moves the pointer only if H's data is newer: never backwards.
    """
    a, _ = publish(store, make_files(1), "run-1", day(1))
    interval = {"older": day(2), "newer": day(3)}
    other_interval = day(3) if held == "older" else day(2)
    read_done, go = threading.Event(), threading.Event()

    def gate() -> None:
        read_done.set()
        assert go.wait(timeout=30)

    h_files = make_files(2)
    result: list = []
    t = threading.Thread(
        target=lambda: result.append(publish(GatedStore(store, gate), h_files, "run-h", interval[held]))
    )
    t.start()
    assert read_done.wait(timeout=30)
    other, flip = publish(store, make_files(3), "run-o", other_interval)
    assert flip.moved
    go.set()
    t.join(timeout=30)
    h, h_flip = result[0]
    assert h_flip.outcome is rel.FlipOutcome.LOST_RACE and not h_flip.moved
    assert live_id(store) == other
    assert rel.read_pointer(store, TENANT)[0]["previous_release_id"] == a

    rerun = rel.flip_pointer(store, TENANT, pointer_for(h, interval[held]))
    if held == "older":
        assert rerun.outcome is rel.FlipOutcome.OLDER_THAN_LIVE and live_id(store) == other
    else:
        assert rerun.moved and live_id(store) == h


# --------------------------------------------------------------------------- 4. pickle payloads


class Payload:
    """Unpickling this runs `touch marker`: proof of code execution if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def pickle_bytes(marker: Path, size: int | None = None) -> bytes:
    """A pickle that touches `marker` when loaded, padded to `size` bytes (pickle ignores trailing bytes)."""
    data = pickle.dumps(Payload(marker), protocol=2)
    if size is not None:
        assert len(data) <= size
        data += b"\x00" * (size - len(data))
    return data


def object_npy_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(marker), 1.0], dtype=object), allow_pickle=True)
    return buf.getvalue()


def forbid_unpickling(mp: pytest.MonkeyPatch) -> list[str]:
    """Any pickle load in this process fails (numpy's object-array and raw-pickle paths use these)."""
    calls: list[str] = []

    def forbidden(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"pickle.{name} was called")

        return call

    for name in ("load", "loads", "Unpickler"):
        mp.setattr(pickle, name, forbidden(name))
    return calls


@pytest.fixture
def no_unpickling(monkeypatch) -> list[str]:
    return forbid_unpickling(monkeypatch)


def test_pickle_payloads_are_live(tmp_path):
    """Control: the payloads below really execute when unpickled (so an absent marker means something)."""
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    pickle.loads(pickle_bytes(m1, size=DIM * 4))
    np.load(io.BytesIO(object_npy_bytes(m2)), allow_pickle=True)
    assert m1.exists() and m2.exists()


NPY_FILES = ("user_vectors.npy", "item_vectors.npy", "seen_indptr.npy", "seen_indices.npy", "popular.npy")


@pytest.mark.parametrize("kind", ["raw-pickle", "object-npy"])
def test_pickle_planted_in_s3_release_with_valid_checksums_is_never_loaded(s3_store, tmp_path, kind, caplog):
    store = s3_store
    a, _ = publish(store, make_files(1), "run-1", day(1))
    cache = ReleaseCache(store, None, poll_seconds=0)
    assert cache.get(TENANT).release_id == a
    marker = tmp_path / "pwned"
    evil = pickle_bytes(marker) if kind == "raw-pickle" else object_npy_bytes(marker)

    for n, name in enumerate(NPY_FILES, start=2):
        files = {**make_files(n), name: evil}  # the manifest's sha256 is of the evil bytes: checksums pass
        before = live_id(store)
        with pytest.raises(rel.ReleaseError, match="allow_pickle"):  # publish verifies before it flips
            publish(store, files, f"run-{n}", day(n))
        assert live_id(store) == before
        b = rel.release_id_for(f"run-{n}", files)  # planted: the pointer moved by hand, past verification
        assert rel.flip_pointer(store, TENANT, pointer_for(b, day(n))).moved and live_id(store) == b
        assert rel.read_file(store, TENANT, b, name, rel.read_manifest(store, TENANT, b)) == evil
        with pytest.MonkeyPatch.context() as mp:
            calls = forbid_unpickling(mp)
            with pytest.raises((ValueError, rel.ReleaseError), match="allow_pickle"):
                rel.load_release(store, TENANT, b)
            with caplog.at_level(logging.ERROR, logger="pipeline.serving.releases"):
                assert cache.get(TENANT).release_id == a  # serving refuses B and keeps A
            assert calls == []
        assert f"cannot load release {b}" in caplog.text and "allow_pickle" in caplog.text
        assert not marker.exists(), f"unpickled a payload planted as {name}"


# lengths of the planted value: not a whole number of float32s / whole but the wrong dim / one vector
REDIS_PAYLOAD_SIZES = {"ragged": DIM * 4 - 3, "wrong-dim": DIM * 4 - 4, "one-vector": DIM * 4}


@pytest.mark.parametrize("size", REDIS_PAYLOAD_SIZES.values(), ids=REDIS_PAYLOAD_SIZES.keys())
def test_pickle_planted_in_redis_user_keys_is_never_unpickled(tmp_path, redis12, no_unpickling, size):
    """A pickle planted in a user's `u:` and `seen:` keys (versioned layout of pipeline.serving.user_store).

    RedisStore.user reads raw float32/int32 bytes (np.frombuffer) and never unpickles. It either
    refuses the value with a ValueError (embeddings.InvalidUserData: wrong length, non-finite
    numbers, seen indices out of range) or returns well-formed float32/int32 arrays of the
    release's dim (meaningless numbers, only that user's results change). No code runs.
    """
    from pipeline.release import refresh

    r, prefix = redis12
    store = LocalStore(tmp_path / "artifacts")
    rid, _ = publish(store, make_files(1), "run-1", day(1))
    loaded = rel.load_release(store, TENANT, rid)
    refresh.write_release(r, prefix, loaded)
    assert refresh.flip(r, prefix, TENANT, rid, grace_seconds=60)[0]

    marker = tmp_path / "pwned"
    evil = pickle_bytes(marker, size)
    r.set(key(prefix, TENANT, rid, "u", "u3"), evil)
    r.set(key(prefix, TENANT, rid, "seen", "u3"), evil)

    cache = ReleaseCache(store, RedisStore(r, prefix), poll_seconds=0)
    live = cache.get(TENANT)
    assert live.release_id == rid and isinstance(live.users, RedisStore)
    vec, _ = live.users.user(live.release, "u4")  # a clean neighbour still reads fine
    assert np.array_equal(vec, loaded.user_vectors[4])

    try:
        got = live.users.user(live.release, "u3")
    except Exception as exc:  # a clean refusal, not an unpickling attempt (checked below)
        got, outcome = None, f"RedisStore.user raised {type(exc).__name__}: {exc}"
        assert isinstance(exc, ValueError), outcome
    else:
        outcome = f"RedisStore.user returned {got!r}"
    if got is not None:  # only well-formed raw numbers may come back: never an object
        vec, seen = got
        assert isinstance(vec, np.ndarray) and vec.dtype == np.float32 and vec.shape == (DIM,), outcome
        assert isinstance(seen, np.ndarray) and seen.dtype == np.int32, outcome
    assert no_unpickling == [], outcome
    assert not marker.exists(), f"unpickled a payload planted in Redis ({outcome})"

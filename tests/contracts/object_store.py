"""The ObjectStore contract (pipeline/storage/base.py): every implementation runs these tests.

A store joins by subclassing `ObjectStoreContract` and supplying one fixture, `make`: a
factory `make(name) -> ObjectStore` giving stores rooted side by side (a folder or a key
prefix per name), empty, in one place per test. Nothing else is implementation-specific.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable

import pytest

from pipeline.storage import ObjectStore, PreconditionFailed, StoreError, open_store

# characters real keys carry: partitions (dt=), release ids, Data Docs pages, source buckets
ODD_KEYS = (
    "dt=2026-01-01/part-0.parquet",
    "runs/20250401T000000Z/validate/data_docs/index.html",
    "a b/c+d,e;f.json",
    "unicode/é-ü-日本.bin",
    "punct/~!$&'()*@:%.txt",
)


class ObjectStoreContract(abc.ABC):
    large_size = 6 * 1024 * 1024 + 123  # a store with a multipart path sets its threshold below this

    @pytest.fixture
    @abc.abstractmethod
    def make(self) -> Callable[[str], ObjectStore]:
        """A factory of empty stores, `make(name)` rooted side by side for sibling names."""

    @pytest.fixture
    def store(self, make) -> ObjectStore:
        return make("root")

    def test_is_an_object_store(self, store):
        assert isinstance(store, ObjectStore)

    # ------------------------------------------------------------------ put / get / exists

    def test_put_get_round_trip(self, store):
        store.put("a/b/one.bin", b"\x00\x01\xff")
        store.put("empty", b"")
        assert store.get("a/b/one.bin") == b"\x00\x01\xff"
        assert store.get("empty") == b""
        assert store.exists("a/b/one.bin") and store.exists("empty")

    def test_missing_key(self, store):
        store.put("a/b/one.bin", b"1")
        assert not store.exists("a/b/two.bin")
        assert not store.exists("a/b")  # a "folder" is not an object
        with pytest.raises(FileNotFoundError, match="a/b/two.bin"):
            store.get("a/b/two.bin")
        assert store.get_with_etag("a/b/two.bin") is None

    def test_overwrite_replaces_the_whole_object(self, store):
        store.put("k", b"x" * 1000)
        store.put("k", b"y")
        assert store.get("k") == b"y"
        assert store.list("") == ["k"]

    @pytest.mark.parametrize("key", ODD_KEYS)
    def test_keys_with_odd_characters(self, store, key):
        store.put(key, key.encode())
        assert store.get(key) == key.encode() and store.exists(key)
        assert store.list(key.split("/", 1)[0] + "/") == [key]
        assert store.uri(key) == f"{store.root}/{key}"
        store.delete(key)
        assert not store.exists(key) and store.list("") == []

    @pytest.mark.parametrize("key", ["../outside", "a/../../outside"])
    def test_keys_cannot_escape_the_root(self, store, key):
        with pytest.raises(StoreError, match="escapes"):
            store.put(key, b"x")

    def test_large_object_round_trips(self, store):
        blob = bytes(range(256)) * (self.large_size // 256) + b"tail"
        store.put("big.bin", blob)
        assert store.get("big.bin") == blob
        data, etag = store.get_with_etag("big.bin")
        assert data == blob and etag

    # ------------------------------------------------------------------ list

    def test_list_is_a_sorted_string_prefix(self, store):
        keys = ["a/b/x", "a/b/y/z", "a/bc", "a/b.txt", "ab", "b"]
        for k in reversed(keys):
            store.put(k, b"1")
        assert store.list("") == sorted(keys)
        assert store.list("a/") == ["a/b.txt", "a/b/x", "a/b/y/z", "a/bc"]
        assert store.list("a") == ["a/b.txt", "a/b/x", "a/b/y/z", "a/bc", "ab"]
        assert store.list("a/b") == ["a/b.txt", "a/b/x", "a/b/y/z", "a/bc"]
        assert store.list("a/b/") == ["a/b/x", "a/b/y/z"]  # no sibling leaks in: a/bc, a/b.txt
        assert store.list("a/b/x") == ["a/b/x"]
        assert store.list("a/c/") == [] and store.list("zzz") == []

    def test_stores_side_by_side_do_not_see_each_other(self, make):
        p, pq = make("p"), make("pq")  # pq's root starts with p's: no leak either way
        p.put("k", b"p")
        pq.put("k", b"pq")
        assert p.list("") == ["k"] and pq.list("") == ["k"]
        assert p.get("k") == b"p" and pq.get("k") == b"pq"

    # ------------------------------------------------------------------ delete, uri

    def test_delete(self, store):
        store.put("a/one", b"1")
        store.put("a/two", b"2")
        store.delete("a/one")
        assert not store.exists("a/one") and store.list("a/") == ["a/two"]
        store.delete("a/one")  # a missing key: no error
        store.delete("never/was")

    def test_uri_names_the_object_and_reopens_the_store(self, store):
        store.put("x/y.json", b"{}")
        assert store.uri("x/y.json") == f"{store.root}/x/y.json"
        assert open_store(store.root).get("x/y.json") == b"{}"

    # ------------------------------------------------------------------ conditional put

    def test_conditional_create(self, store):
        store.put_if("ptr", b"v1", etag=None)
        with pytest.raises(PreconditionFailed):
            store.put_if("ptr", b"again", etag=None)  # if-none-match: it exists now
        assert store.get("ptr") == b"v1"

    def test_conditional_replace(self, store):
        store.put_if("ptr", b"v1", etag=None)
        data, etag = store.get_with_etag("ptr")
        assert data == b"v1" and isinstance(etag, str)
        store.put_if("ptr", b"v2", etag=etag)
        with pytest.raises(PreconditionFailed):
            store.put_if("ptr", b"v3", etag=etag)  # stale etag loses
        with pytest.raises(PreconditionFailed):
            store.put_if("ptr", b"v3", etag='"not-an-etag"')
        assert store.get("ptr") == b"v2"

    def test_conditional_replace_sees_plain_puts_and_deletes(self, store):
        store.put("ptr", b"v1")
        _, etag = store.get_with_etag("ptr")
        store.put("ptr", b"changed")
        with pytest.raises(PreconditionFailed):
            store.put_if("ptr", b"v2", etag=etag)
        _, etag = store.get_with_etag("ptr")
        store.delete("ptr")
        with pytest.raises(PreconditionFailed):
            store.put_if("ptr", b"v2", etag=etag)  # if-match on an object that is gone
        assert not store.exists("ptr")

    def test_concurrent_conditional_writers_exactly_one_wins(self, store):
        store.put_if("race", b"base", etag=None)
        _, etag = store.get_with_etag("race")
        wins, losses = [], []
        barrier = threading.Barrier(8)

        def writer(n: int) -> None:
            barrier.wait()
            try:
                store.put_if("race", f"w{n}".encode(), etag=etag)
                wins.append(n)
            except PreconditionFailed:
                losses.append(n)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and len(losses) == 7
        assert store.get("race") == f"w{wins[0]}".encode()

"""The UserStore contract (pipeline/serving/user_store.py): every implementation runs these tests.

A store joins by subclassing `UserStoreContract` and supplying one fixture, `make`: a factory
`make(release) -> UserStore` that serves `release` as production would put it there. The
release is built here, small, with the release writer: users u0..u{N-1} (u3 has no seen
items) and one corrupt user, `u-corrupt`, whose stored vector is NaN (checksums pass: the
bytes are what was written, the numbers are unusable).

Where the implementations differ by design, the subclass says so in a class attribute:
`tracks_current` (does the store know which release is live, or does the artifact store's
pointer decide).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import numpy as np
import pytest

from pipeline.index import build as index
from pipeline.index import search as ann
from pipeline.release import format as release
from pipeline.serving.user_store import InvalidUserData, UserStore
from pipeline.storage import LocalStore

TENANT = "acme"
N_USERS, N_ITEMS, DIM = 50, 40, 8
CORRUPT = "u-corrupt"
NO_SEEN = "u3"


def build_release(root) -> release.Release:
    rng = np.random.default_rng(5)
    user_vectors = rng.standard_normal((N_USERS + 1, DIM)).astype(np.float32)
    user_vectors[N_USERS] = np.nan
    item_vectors = rng.standard_normal((N_ITEMS, DIM)).astype(np.float32)
    counts = rng.integers(1, 9, N_USERS + 1)
    counts[3] = 0
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    files = release.files_from_vectors(
        [f"u{i}" for i in range(N_USERS)] + [CORRUPT],
        [f"i{j}" for j in range(N_ITEMS)],
        user_vectors,
        item_vectors,
        indptr,
        rng.integers(0, N_ITEMS, int(indptr[-1])).astype(np.int32),
        index_bytes=ann.serialize(index.build_index(item_vectors)[0]),
        model_meta={"kind": "als"},
        popular_items=10,
    )
    store = LocalStore(root)
    # planted past publish's verification (its smoke query refuses a NaN user vector): the
    # contract is what a store does with such a user, as if the bytes went bad after publish
    manifest = {"run_id": "r1", "data_interval_end": "2026-01-01"}
    out = release.publish_release(store, TENANT, files, manifest, verify=False)
    return release.load_release(store, TENANT, out.release_id)


def assert_user(got, vector: np.ndarray, seen: np.ndarray) -> None:
    assert isinstance(got, tuple) and len(got) == 2, got
    assert got[0].dtype == np.float32 and got[1].dtype == np.int32
    np.testing.assert_array_equal(got[0], vector)
    np.testing.assert_array_equal(got[1], seen)


class UserStoreContract(abc.ABC):
    tracks_current: bool

    @pytest.fixture
    @abc.abstractmethod
    def make(self) -> Callable[[release.Release], UserStore]:
        """A factory: the store serving `release` (written where production would write it)."""

    @pytest.fixture
    def rel(self, tmp_path) -> release.Release:
        return build_release(tmp_path / "artifacts")

    @pytest.fixture
    def store(self, make, rel) -> UserStore:
        return make(rel)

    def row(self, rel: release.Release, user_id: str) -> int:
        return int(rel.user_ids.get_loc(user_id))

    # ------------------------------------------------------------------ current

    def test_current(self, store, rel):
        assert store.current(TENANT) == (rel.release_id if self.tracks_current else None)
        assert store.current("another-tenant") is None

    # ------------------------------------------------------------------ one user

    @pytest.mark.parametrize("user_id", ["u0", "u7", f"u{N_USERS - 1}", NO_SEEN])
    def test_known_user_is_the_release_data(self, store, rel, user_id):
        r = self.row(rel, user_id)
        assert_user(store.user(rel, user_id), rel.user_vectors[r], rel.seen(r))  # seen newest first, as released
        assert (len(rel.seen(r)) == 0) == (user_id == NO_SEEN)

    @pytest.mark.parametrize("user_id", ["nobody", "", "u", f"u{N_USERS}", "U0"])
    def test_unknown_user_is_none(self, store, rel, user_id):
        assert store.user(rel, user_id) is None

    def test_corrupt_user_is_refused(self, store, rel):
        with pytest.raises(InvalidUserData, match="non-finite"):
            store.user(rel, CORRUPT)

    # ------------------------------------------------------------------ many users

    def test_many_users_in_one_call_keep_their_order(self, store, rel):
        rng = np.random.default_rng(0)
        ids = [f"u{i}" for i in rng.permutation(N_USERS)] + ["nobody", CORRUPT, "u0", "ghost", "u0"]
        ids = [ids[i] for i in rng.permutation(len(ids))]
        got = store.users(rel, ids)
        assert len(got) == len(ids)
        for user_id, one in zip(ids, got, strict=True):
            if user_id == CORRUPT:
                assert isinstance(one, InvalidUserData) and "non-finite" in str(one)
            elif user_id in ("nobody", "ghost"):
                assert one is None
            else:
                r = self.row(rel, user_id)
                assert_user(one, rel.user_vectors[r], rel.seen(r))
        assert store.users(rel, []) == []

    # ------------------------------------------------------------------ fold-in

    def test_fold_then_user_returns_the_folded_data(self, store, rel):
        vector = np.arange(DIM, dtype=np.float64) / 10  # stored as float32 whatever it was given
        seen = np.array([5, 2, 9], dtype=np.int64)
        store.fold(rel, "u7", vector, seen)
        assert_user(store.user(rel, "u7"), vector.astype(np.float32), seen.astype(np.int32))
        r = self.row(rel, "u8")
        assert_user(store.user(rel, "u8"), rel.user_vectors[r], rel.seen(r))  # neighbours untouched
        again = np.ones(DIM, dtype=np.float32)
        store.fold(rel, "u7", again, np.array([1], dtype=np.int32))  # the latest fold wins
        assert_user(store.user(rel, "u7"), again, np.array([1], dtype=np.int32))

    def test_fold_makes_an_unknown_user_known_and_replaces_corrupt_data(self, store, rel):
        vector = np.full(DIM, 0.5, dtype=np.float32)
        for user_id in ("newcomer", CORRUPT):
            store.fold(rel, user_id, vector, np.array([3], dtype=np.int32))
        got = store.users(rel, ["newcomer", CORRUPT, "nobody"])
        assert_user(got[0], vector, np.array([3], dtype=np.int32))
        assert_user(got[1], vector, np.array([3], dtype=np.int32))
        assert got[2] is None

    def test_folded_data_is_checked_like_stored_data(self, store, rel):
        store.fold(rel, "u1", np.full(DIM, np.inf, dtype=np.float32), np.array([0], dtype=np.int32))
        store.fold(rel, "u2", np.zeros(DIM, dtype=np.float32), np.array([N_ITEMS], dtype=np.int32))
        with pytest.raises(InvalidUserData, match="non-finite"):
            store.user(rel, "u1")
        with pytest.raises(InvalidUserData, match="out of range"):
            store.user(rel, "u2")

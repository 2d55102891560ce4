"""The UserStore contract, run by the embedded store, by Redis (real server, keys written by
the refresh stage's own `write_release` + `flip`) and by serving's breaker-guarded Redis store,
plus what each does beyond it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.release import refresh
from pipeline.serving.breaker import Breaker, Unavailable
from pipeline.serving.user_store import (
    FOLD_TTL_SECONDS,
    EmbeddedStore,
    InvalidUserData,
    RedisStore,
    ResilientRedisStore,
)
from pipeline.storage.redis import key, redis_client, serving_async_redis_client, serving_redis_client
from tests.conftest import REDIS_URL
from tests.contracts.user_store import CORRUPT, DIM, N_ITEMS, TENANT, UserStoreContract, assert_user


class TestEmbeddedStore(UserStoreContract):
    tracks_current = False  # by design: no store of its own; the artifact store's pointer names the release

    @pytest.fixture
    def make(self):
        return lambda rel: EmbeddedStore()

    def test_folded_users_are_an_lru_of_bounded_size(self, rel):
        store = EmbeddedStore(max_folded=2)
        vec = np.ones(DIM, dtype=np.float32)
        for user_id in ("u1", "u2", "u1", "u3"):  # u2 is the least recently folded when u3 comes
            store.fold(rel, user_id, vec, np.array([0], dtype=np.int32))
        assert_user(store.user(rel, "u1"), vec, np.array([0], dtype=np.int32))
        assert_user(store.user(rel, "u3"), vec, np.array([0], dtype=np.int32))
        assert_user(store.user(rel, "u2"), rel.user_vectors[2], rel.seen(2))  # evicted: the release's data again

    def test_max_folded_zero_turns_folding_off(self, rel):
        store = EmbeddedStore(max_folded=0)
        store.fold(rel, "newcomer", np.ones(DIM, dtype=np.float32), np.array([0], dtype=np.int32))
        assert store.user(rel, "newcomer") is None


@pytest.mark.integration
class TestRedisStore(UserStoreContract):
    tracks_current = True  # the refresh stage's Redis pointer, flipped last

    @pytest.fixture
    def client(self):
        r = redis_client(REDIS_URL)
        yield r
        r.close()

    @pytest.fixture
    def make(self, client, redis_prefix):
        def make(rel):
            refresh.write_release(client, redis_prefix, rel)
            assert refresh.flip(client, redis_prefix, TENANT, rel.release_id, grace_seconds=60)[0]
            return RedisStore(client, redis_prefix)

        return make

    @pytest.mark.parametrize(
        ("part", "value", "match"),
        [
            ("u", b"\x00" * (DIM * 4 - 3), "bytes, expected"),  # not a whole number of float32s
            ("u", b"\x00" * (DIM * 4 + 4), "bytes, expected"),  # whole, but another dimension
            ("seen", b"\x00" * 6, "not a multiple of 4"),
            ("seen", np.array([N_ITEMS], dtype=np.int32).tobytes(), "out of range"),
            ("seen", np.array([-1], dtype=np.int32).tobytes(), "out of range"),
        ],
    )
    def test_malformed_bytes_are_refused(self, store, rel, client, redis_prefix, part, value, match):
        client.set(key(redis_prefix, TENANT, rel.release_id, part, "u5"), value)
        with pytest.raises(InvalidUserData, match=match):
            store.user(rel, "u5")
        got = store.users(rel, ["u4", "u5"])
        assert_user(got[0], rel.user_vectors[4], rel.seen(4)) and isinstance(got[1], InvalidUserData)

    def test_many_users_are_one_round_trip(self, store, rel, client, monkeypatch):
        calls = []
        real = client.mget
        monkeypatch.setattr(client, "mget", lambda keys: calls.append(len(keys)) or real(keys))
        assert len(store.users(rel, [f"u{i}" for i in range(40)] + [CORRUPT, "nobody"])) == 42
        assert calls == [42 * 4]  # fold-in vector and seen, release vector and seen, per user

    def test_folds_live_under_the_release_and_expire(self, store, rel, client, redis_prefix):
        store.fold(rel, "u6", np.ones(DIM, dtype=np.float32), np.array([1], dtype=np.int32))
        for part in ("fu", "fseen"):
            ttl = client.ttl(key(redis_prefix, TENANT, rel.release_id, part, "u6"))
            assert FOLD_TTL_SECONDS - 60 < ttl <= FOLD_TTL_SECONDS
        assert client.get(key(redis_prefix, TENANT, rel.release_id, "u", "u6")) == rel.user_vectors[6].tobytes()


@pytest.mark.integration
class TestResilientRedisStore(TestRedisStore):
    """Serving's Redis store (breaker + the release's rows when Redis is away) keeps the whole contract."""

    @pytest.fixture
    def make(self, client, redis_prefix):
        def make(rel):
            refresh.write_release(client, redis_prefix, rel)
            assert refresh.flip(client, redis_prefix, TENANT, rel.release_id, grace_seconds=60)[0]
            return ResilientRedisStore(client, redis_prefix, Breaker("redis"))

        return make

    def test_redis_away_answers_from_the_release_then_skips_it(self, rel, redis_prefix):
        down = serving_redis_client("redis://127.0.0.1:1/0", 50)  # nothing listens on port 1
        store = ResilientRedisStore(down, redis_prefix, Breaker("redis", failures=2, reset_seconds=60))
        got, reason = store.read_users(rel, ["u4", "nobody"])
        assert reason == "redis_unavailable" and got[1] is None
        assert_user(got[0], rel.user_vectors[4], rel.seen(4))  # personal from the release's own rows
        with pytest.raises(Unavailable):
            store.current(TENANT)  # the second failure opens the breaker
        assert store.breaker.is_open
        assert store.read_users(rel, ["u4"])[1] == "redis_breaker_open"
        with pytest.raises(Unavailable):
            store.fold(rel, "u4", np.ones(DIM, dtype=np.float32), np.array([1], dtype=np.int32))

    def test_a_user_redis_lost_is_read_from_the_release(self, store, rel, client, redis_prefix):
        client.delete(*(key(redis_prefix, TENANT, rel.release_id, part, "u7") for part in ("u", "seen")))
        got, reason = store.read_users(rel, ["u7", "u8", "nobody"])
        assert reason == "redis_lost_users" and got[2] is None
        assert_user(got[0], rel.user_vectors[7], rel.seen(7))
        assert store.read_users(rel, ["u8", "nobody"])[1] is None  # a cold user is not a degraded answer

    def test_async_read_matches_the_sync_one_and_degrades_the_same(self, store, rel, client, redis_prefix):
        """The async routes' read (redis.asyncio): same users, same lost-key and outage answers, same breaker."""

        async def both(s: ResilientRedisStore, ids: list[str]):
            try:
                return await s.aread_users(rel, ids)
            finally:
                await s.aclient.aclose()

        store.aclient = serving_async_redis_client(REDIS_URL, 500)
        client.delete(*(key(redis_prefix, TENANT, rel.release_id, part, "u7") for part in ("u", "seen")))
        got, reason = asyncio.run(both(store, ["u3", "u7", "nobody"]))
        assert reason == "redis_lost_users" and got[2] is None
        assert_user(got[0], rel.user_vectors[3], rel.seen(3))
        assert_user(got[1], rel.user_vectors[7], rel.seen(7))
        down = serving_redis_client("redis://127.0.0.1:1/0", 50)
        away = ResilientRedisStore(down, redis_prefix, Breaker("redis", failures=1, reset_seconds=60))
        away.aclient = serving_async_redis_client("redis://127.0.0.1:1/0", 50)
        got, reason = asyncio.run(both(away, ["u4"]))
        assert reason == "redis_unavailable" and away.breaker.is_open
        assert_user(got[0], rel.user_vectors[4], rel.seen(4))
        away.aclient = serving_async_redis_client("redis://127.0.0.1:1/0", 50)
        assert asyncio.run(both(away, ["u4"]))[1] == "redis_breaker_open"

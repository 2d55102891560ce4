"""Tenant sources against real services: files of every format, Hive partitions (local and on
S3 through moto's HTTP server), SQL on the local PostgreSQL, event types and user attributes."""

from __future__ import annotations

import gzip
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from pipeline.config import TenantConfig
from pipeline.context import RunContext, StageError
from pipeline.data import attributes, extract, history
from pipeline.storage import paths


@pytest.fixture(autouse=True, params=["pandas", "duckdb"])
def engine(request, monkeypatch):
    """Every case on both engines: the out-of-core extract (data.engine: duckdb) keeps the same rules."""
    monkeypatch.setattr(extract, "engine_of", lambda ctx: request.param)
    return request.param


PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DAY0 = datetime(2025, 3, 1, tzinfo=UTC)


def _cfg(source: dict, tenant: str = "acme", **extra) -> TenantConfig:
    return TenantConfig.model_validate({"tenant": tenant, "schedule": "0 0 * * *", "source": source, **extra})


def _ctx(settings, cfg, end: datetime) -> RunContext:
    return RunContext(config=cfg, interval_end=end, settings=settings)


def _day_events(day: int, n: int = 4, kinds=("view", "click", "purchase", "view")) -> pd.DataFrame:
    base = DAY0 + timedelta(days=day)
    return pd.DataFrame(
        {
            "uid": [f"{day:02d}{i:03d}" for i in range(n)],  # leading zeros: ids stay strings
            "sku": [f"0{i % 3}" for i in range(n)],
            "ts": [(base + timedelta(hours=2 * i + 1)).isoformat() for i in range(n)],
            "action": [kinds[i % len(kinds)] for i in range(n)],
            "stars": [float(1 + i % 5) for i in range(n)],
        }
    )


COLUMNS = {"user_id": "uid", "item_id": "sku", "timestamp": "ts", "event_type": "action", "rating": "stars"}


def test_csv_parquet_jsonl_and_gzip_in_one_folder_with_event_weights(settings):
    folder = settings.data_root / "mixed"
    folder.mkdir()
    _day_events(0).to_csv(folder / "a.csv", index=False)
    _day_events(1).to_parquet(folder / "b.parquet")
    (folder / "c.jsonl").write_text(_day_events(2).to_json(orient="records", lines=True))
    (folder / "d.ndjson.gz").write_bytes(gzip.compress(_day_events(3).to_json(orient="records", lines=True).encode()))
    (folder / "notes.txt").write_text("ignored")
    events = _day_events(4, kinds=("view", "Share", "", "PURCHASE"))
    events.loc[2, "action"] = None
    events.to_csv(folder / "e.csv", index=False)
    cfg = _cfg(
        {
            "uri": str(folder),
            "columns": COLUMNS,
            "event_types": {"view": 1, "Click": 2, "purchase": 8},
            "rating_threshold": 2,
        }
    )
    ctx = _ctx(settings, cfg, DAY0 + timedelta(days=5))
    result = extract.extract(ctx)
    out = ctx.read_parquet(paths.INTERACTIONS)
    assert result["files"] == 5 and result["source_kind"] == "files" and result["bootstrap"]
    assert list(out.columns) == ["user_id", "item_id", "timestamp", "rating", "event_type", "weight"]
    assert str(out["user_id"].dtype) == "string" and out["user_id"].str.len().eq(5).all()
    assert str(out["timestamp"].dtype) == "datetime64[us, UTC]"
    # 20 events: 1 of an unknown type ("share"), 5 rated 1 (below the threshold)
    assert result["dropped_unknown_event_types"] == {"share": 1}
    assert result["dropped_below_rating_threshold"] == 5
    assert len(out) == result["rows"] == 14
    weights = dict(zip(out["event_type"], out["weight"], strict=False))
    assert weights == {"view": 1.0, "click": 2.0, "purchase": 8.0, "interaction": 1.0}  # missing type: interaction
    assert (out["rating"] >= 2).all()
    # the history keeps the raw events (types and ratings included): weights apply when reading
    hist = history.read(ctx.store, list(history.partitions(ctx.store, "acme").values()))
    assert len(hist) == 20 and "share" in set(hist["event_type"])


def test_unknown_event_types_can_fail_the_run_before_the_history_is_touched(settings):
    path = settings.data_root / "events.csv"
    _day_events(0, kinds=("view", "like")).to_csv(path, index=False)
    cfg = _cfg({"uri": str(path), "columns": COLUMNS, "event_types": {"view": 1}, "unknown_event_types": "error"})
    ctx = _ctx(settings, cfg, DAY0 + timedelta(days=1))
    with pytest.raises(StageError, match=r"unknown event types \{'like': 2\}.*source.event_types \['view'\]"):
        extract.extract(ctx)
    assert history.partitions(ctx.store, "acme") == {}


def _write_partitions(root, days: range, arrival_offset: int = 0) -> None:
    for day in days:
        folder = root / f"dt={(DAY0 + timedelta(days=day + arrival_offset)).date().isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        _day_events(day).to_parquet(folder / "part-0.parquet")


def test_hive_partitions_read_only_the_days_the_run_needs(settings):
    src = settings.data_root / "events"
    _write_partitions(src, range(10))
    cfg = _cfg({"uri": str(src), "columns": COLUMNS})
    first = extract.extract(_ctx(settings, cfg, DAY0 + timedelta(days=6)))
    assert first["bootstrap"] and first["files"] == 6 and first["source_kind"] == "partitioned"
    # a broken file in a day the next run does not need proves it is never downloaded
    (src / f"dt={DAY0.date().isoformat()}" / "part-0.parquet").write_bytes(b"not parquet")
    ctx = _ctx(settings, cfg, DAY0 + timedelta(days=7))
    nightly = extract.extract(ctx)
    assert not nightly["bootstrap"] and nightly["files"] == 3  # interval day 6 + 2 lookback days
    assert nightly["window_start"] == (DAY0 + timedelta(days=4)).isoformat()
    assert nightly["history_partitions_written"] == 3 and nightly["history_partitions_read"] == 4
    assert len(ctx.read_parquet(paths.INTERACTIONS)) == 7 * 4 and nightly["rows"] == 28
    # a partition outside the Hive layout is refused with the file named
    (src / "stray.parquet").write_bytes(b"")
    with pytest.raises(StageError, match="stray.parquet is in no such partition"):
        extract.extract(ctx)


@pytest.fixture
def bucket(s3_env):
    import boto3

    name = f"src-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    return client, name


@pytest.mark.integration
def test_s3_object_prefix_and_partitions(settings, bucket):
    client, name = bucket
    for day in range(6):
        key = f"raw/dt={(DAY0 + timedelta(days=day)).date().isoformat()}/events.jsonl"
        client.put_object(Bucket=name, Key=key, Body=_day_events(day).to_json(orient="records", lines=True).encode())
    client.put_object(Bucket=name, Key="flat/one.csv", Body=_day_events(0).to_csv(index=False).encode())
    client.put_object(Bucket=name, Key="users/u.csv", Body=b"id,country,segment\n00000,DE,a\n00001,FR,b\n00000,AT,c\n")

    cfg = _cfg(
        {"uri": f"s3://{name}/raw/", "columns": COLUMNS},
        users={"uri": f"s3://{name}/users/u.csv", "columns": {"user_id": "id", "attributes": {"country": "country"}}},
    )
    boot = extract.extract(_ctx(settings, cfg, DAY0 + timedelta(days=4)))
    assert boot["bootstrap"] and boot["files"] == 4 and boot["rows"] == 16
    ctx = _ctx(settings, cfg, DAY0 + timedelta(days=6))
    nightly = extract.extract(ctx)
    assert nightly["files"] == 3 and nightly["rows"] == 24  # days 3..5: interval day 5 + 2 lookback days
    assert nightly["user_attributes"] == 2
    users = attributes.load_users(ctx)
    assert users.to_dict("list") == {"user_id": ["00000", "00001"], "country": ["AT", "FR"]}  # last row wins

    flat = _cfg({"uri": f"s3://{name}/flat/one.csv", "columns": COLUMNS}, tenant="flat")
    one = extract.extract(_ctx(settings, flat, DAY0 + timedelta(days=1)))
    assert one["files"] == 1 and one["rows"] == 4
    with pytest.raises(StageError, match="no .* objects found"):
        extract.extract(_ctx(settings, _cfg({"uri": f"s3://{name}/nothing/", "columns": COLUMNS}, tenant="none"), DAY0))


@pytest.fixture
def pg_table():
    """A table of events in a schema of its own on the local PostgreSQL, dropped afterwards."""
    sa = pytest.importorskip("sqlalchemy")
    engine = sa.create_engine(PG_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # pragma: no cover - the service is part of the test environment
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL}: {exc}")
    schema = f"recsys_extract_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"create schema {schema}"))
        conn.execute(
            sa.text(
                f"create table {schema}.events (uid text, sku bigint, ts timestamptz, loaded_at timestamptz, "
                "action text, stars double precision)"
            )
        )
        conn.execute(sa.text(f"create table {schema}.users (id text primary key, country text, age int)"))
        conn.execute(sa.text(f"insert into {schema}.users values ('00000', 'DE', 31), ('00001', NULL, 40)"))

    def insert(rows: list[dict]) -> None:
        with engine.begin() as conn:
            conn.execute(
                sa.text(f"insert into {schema}.events values (:uid, :sku, :ts, :loaded_at, :action, :stars)"),
                rows,
            )

    yield schema, insert
    with engine.begin() as conn:
        conn.execute(sa.text(f"drop schema {schema} cascade"))
    engine.dispose()


def _rows(day: int, late_from: int | None = None) -> list[dict]:
    df = _day_events(day if late_from is None else late_from)
    loaded = DAY0 + timedelta(days=day, hours=23)
    return [
        {
            "uid": r.uid,
            "sku": int(r.sku),
            "ts": datetime.fromisoformat(r.ts),
            "loaded_at": loaded,
            "action": r.action,
            "stars": r.stars,
        }
        for r in df.itertuples()
    ]


@pytest.mark.integration
def test_sql_source_on_postgres_reads_only_the_window(settings, pg_table, monkeypatch):
    schema, insert = pg_table
    for day in range(8):
        insert(_rows(day))
    monkeypatch.setenv("RECSYS_TEST_PG_USER", "postgres")  # ${VAR} in a URL: secrets stay out of the file
    query = f"select uid, sku, ts, action, stars from {schema}.events where ts >= :start and ts < :end"
    cfg = _cfg(
        {
            "uri": "postgresql+psycopg://${RECSYS_TEST_PG_USER}@127.0.0.1:5432/test",
            "query": query,
            "columns": COLUMNS,
            "event_types": {"view": 1, "click": 3, "purchase": 9},
        },
        users={
            "uri": PG_URL,
            "query": f"select * from {schema}.users where :end is not null",
            "columns": {"user_id": "id"},
        },
    )
    boot = extract.extract(_ctx(settings, cfg, DAY0 + timedelta(days=5)))
    assert boot["bootstrap"] and boot["source_kind"] == "sql" and boot["rows"] == 20
    ctx = _ctx(settings, cfg, DAY0 + timedelta(days=6))
    nightly = extract.extract(ctx)
    assert nightly["window_start"] == (DAY0 + timedelta(days=3)).isoformat()
    assert nightly["history_rows_written"] == 12  # days 3, 4, 5: the query's :start/:end
    out = ctx.read_parquet(paths.INTERACTIONS)
    assert len(out) == 24 and out["item_id"].isin(["0", "1", "2"]).all()  # bigint ids -> strings
    assert set(out["weight"]) == {1.0, 3.0, 9.0}
    users = attributes.load_users(ctx)
    assert users["user_id"].tolist() == ["00000", "00001"] and users["age"].tolist() == [31, 40]

    # a query on load time returns late events too: inside the lookback window they land in
    # their own day; older ones are dropped and counted
    insert(_rows(6, late_from=4)[:1] + _rows(6, late_from=1)[:1])
    by_load = f"select uid, sku, ts, action, stars from {schema}.events where loaded_at >= :start and loaded_at < :end"
    cfg_load = _cfg({"uri": PG_URL, "query": by_load, "columns": COLUMNS})
    before = {d: ctx.store.get(k) for d, k in history.partitions(ctx.store, "acme").items()}
    late = extract.extract(_ctx(settings, cfg_load, DAY0 + timedelta(days=7)))
    after = {d: ctx.store.get(k) for d, k in history.partitions(ctx.store, "acme").items()}
    assert late["late_dropped"] == 1
    changed = sorted(d for d in after if before.get(d) != after[d])
    assert changed == [(DAY0 + timedelta(days=4)).date(), (DAY0 + timedelta(days=6)).date()]

    bad = _cfg({"uri": PG_URL, "query": "select * from nowhere where :start < :end", "columns": COLUMNS})
    with pytest.raises(StageError, match="source.query on postgresql\\+psycopg://postgres@127.0.0.1:5432/test"):
        extract.extract(_ctx(settings, bad, DAY0 + timedelta(days=8)))


def test_sql_source_on_sqlite_and_config_errors(settings, tmp_path):
    import sqlite3

    db = tmp_path / "events.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table ev (uid text, sku text, ts integer)")
        conn.executemany("insert into ev values (?, ?, ?)", [("1", "a", 1740787200 + 3600 * h) for h in range(30)])
    cfg = _cfg(
        {
            "uri": f"sqlite:///{db}",
            "query": "select * from ev where ts >= cast(strftime('%s', :start) as integer) "
            "and ts < cast(strftime('%s', :end) as integer)",
            "columns": {"user_id": "uid", "item_id": "sku", "timestamp": "ts"},
        }
    )
    result = extract.extract(_ctx(settings, cfg, DAY0 + timedelta(days=1)))
    assert result["rows"] == 24
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="give a query too"):
        _cfg({"uri": f"sqlite:///{db}"})
    with pytest.raises(ValidationError, match=":end"):
        _cfg({"uri": f"sqlite:///{db}", "query": "select * from ev where ts >= :start"})
    with pytest.raises(ValidationError, match="only for SQL sources"):
        _cfg({"uri": "a.csv", "query": "select 1 where :start < :end"})
    with pytest.raises(ValidationError, match="listed twice"):
        _cfg({"uri": "a.csv", "event_types": {"View": 1, "view": 2}})

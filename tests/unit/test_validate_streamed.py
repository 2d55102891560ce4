"""Validation out of core (data.engine: duckdb): the same verdicts, counts and messages as the
in-memory suite, with DuckDB's exact counts over every row and GX on a sample."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.context import RunContext
from pipeline.data import extract
from pipeline.storage import codecs, paths
from pipeline.validation import stage as validate
from pipeline.validation import streamed
from tests.conftest import INTERVAL_END, write_tenant

END = INTERVAL_END


def _dirty(small_df: pd.DataFrame) -> pd.DataFrame:
    df = small_df.copy().astype({"user_id": "object", "item_id": "object", "timestamp": "object"})
    df.loc[0, "user_id"] = None  # null id
    df.loc[1, "item_id"] = "  "  # empty id after strip
    df.loc[2, "timestamp"] = 100  # 1970: implausible
    df = pd.concat([df, df.iloc[-10:]], ignore_index=True)  # repeats in the interval
    df.loc[4, "rating"] = 11  # outside rating_range
    hour = pd.Timestamp(END) - pd.Timedelta(hours=5)
    bot = pd.DataFrame(
        {
            "user_id": "bot-7",
            "item_id": [f"i{i % 120}" for i in range(1500)],
            "timestamp": [int(hour.timestamp()) + i * 2 for i in range(1500)],
            "rating": 3.0,
        }
    )
    return pd.concat([df, bot], ignore_index=True)


def _validated(settings, tmp_path, engine: str, df: pd.DataFrame, catalog: list[str] | None) -> dict:
    s = settings.model_copy(update={"artifact_root": str(tmp_path / engine)})
    extra = {}
    if catalog is not None:
        path = tmp_path / "items.csv"
        pd.DataFrame({"item_id": catalog}).to_csv(path, index=False)
        extra["catalog"] = {"uri": str(path)}
    cfg = write_tenant(
        s, "acme", df, validation={"rating_range": [1, 5]}, data={"engine": engine, "memory_limit_gb": 1}, **extra
    )
    ctx = RunContext(config=cfg, interval_end=END, settings=s)
    extract.extract(ctx)
    try:
        validate.validate(ctx)
    except validate.ValidationFailed:
        pass
    report = codecs.read_json(ctx.store.get(ctx.key(paths.VALIDATION_REPORT)))
    report["_excluded"] = sorted(ctx.read_parquet(paths.EXCLUDED_USERS)["user_id"])
    return report


def _comparable(report: dict) -> dict:
    keep = ("check", "expectation", "column", "severity", "success", "element_count", "unexpected_count")
    return {
        "success": report["success"],
        "rows": report["rows"],
        "duplicate_rows": report["duplicate_rows"],
        "interval": report["interval"],
        "rows_checked": report["rows_checked"],
        "failures": report["failures"],
        "warnings": report["warnings"],
        "checks": [{k: v for k, v in c.items()} for c in report["checks"]],
        "expectations": [{k: e[k] for k in keep} for e in report["expectations"]],
        "excluded": report["_excluded"],
    }


@pytest.mark.parametrize("bots_filtered", [False, True])
def test_duckdb_validation_equals_the_in_memory_suite(settings, small_df, tmp_path, bots_filtered):
    df = _dirty(small_df)
    last_day = pd.to_numeric(small_df["timestamp"]) >= pd.Timestamp("2025-03-31", tz="UTC").timestamp()
    retired = sorted(set(small_df.loc[last_day, "item_id"]))[:3]
    catalog = sorted(set(small_df["item_id"]) - set(retired))
    if bots_filtered:
        path = settings.expectations_dir / "acme.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("bot_users: {filter: true}\n")
    mem = _validated(settings, tmp_path, "pandas", df, catalog)
    ooc = _validated(settings, tmp_path, "duckdb", df, catalog)
    a, b = _comparable(ooc), _comparable(mem)
    for k in a:
        if isinstance(a[k], list):
            for x, y in zip(a[k], b[k], strict=True):
                assert x == y, k
        assert a[k] == b[k], k
    assert not mem["success"] and len(mem["failures"]) == 5 and mem["duplicate_rows"] == 10
    assert ("bot-7" in mem["_excluded"]) is bots_filtered
    on = {e["expectation"] + str(e["column"]): e.get("evaluated_on") for e in ooc["expectations"]}
    assert on["expect_compound_columns_to_be_unique['user_id', 'item_id', 'timestamp', 'event_type']"] == (
        "all rows (duckdb)"
    )
    assert on["expect_column_values_to_be_of_typeuser_id"] == "sample"


def test_exact_counts_do_not_depend_on_the_sample(settings, small_df, tmp_path, monkeypatch):
    df = _dirty(small_df)
    mem = _validated(settings, tmp_path, "pandas", df, None)
    monkeypatch.setattr(streamed, "SAMPLE_ROWS", 50)  # GX sees ~50 of ~5,400 rows
    ooc = _validated(settings, tmp_path, "duckdb", df, None)
    assert _comparable(ooc)["failures"] == _comparable(mem)["failures"]
    exact = [e for e in ooc["expectations"] if e.get("evaluated_on") == "all rows (duckdb)"]
    assert exact and all(
        (e["unexpected_count"], e["success"]) == (m["unexpected_count"], m["success"])
        for e, m in zip(ooc["expectations"], mem["expectations"], strict=True)
        if e in exact
    )
    assert ooc["statistics"]["evaluated_expectations"] == mem["statistics"]["evaluated_expectations"]
    assert any(f.startswith("duplicates: ") and "20 of " in f for f in ooc["failures"])

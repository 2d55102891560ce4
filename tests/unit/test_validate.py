import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.config.expectations import ExpectationsFileError, SuiteConfig, load_suite_config
from pipeline.context import RunContext
from pipeline.data import extract
from pipeline.features import stage as features
from pipeline.storage import codecs, paths
from pipeline.validation import stage as validate
from tests.conftest import INTERVAL_END, write_tenant

END = INTERVAL_END  # small_df's events run up to 2025-03-31 22:38: the interval holds its last day's
ROOT = Path(__file__).resolve().parents[2]


def _run(settings, df, end=END, **overrides):
    cfg = write_tenant(settings, "acme", df, **overrides)
    ctx = RunContext(config=cfg, interval_end=end, settings=settings)
    extract.extract(ctx)
    return ctx


def _canonical(df: pd.DataFrame) -> pd.DataFrame:
    """small_df as extract writes it (for tests that hand validate columns extract cannot make yet)."""
    out = df.copy()
    out["user_id"] = out["user_id"].astype("string")
    out["item_id"] = out["item_id"].astype("string")
    out["timestamp"] = pd.to_datetime(out["timestamp"], unit="s", utc=True).astype("datetime64[us, UTC]")
    return out


def _with_extract(settings, small_df, frame: pd.DataFrame, **overrides) -> RunContext:
    """A run whose extract output is `frame` (written as extract would)."""
    cfg = write_tenant(settings, "acme", small_df, **overrides)
    ctx = RunContext(config=cfg, interval_end=END, settings=settings)
    ctx.store.put(ctx.key(paths.INTERACTIONS), codecs.parquet_bytes(frame))
    return ctx


def _expectations(settings, tenant: str, doc) -> Path:
    path = settings.expectations_dir / f"{tenant}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def _excluded(ctx) -> set[str]:
    return set(ctx.read_parquet(paths.EXCLUDED_USERS)["user_id"])


def _report(ctx):
    return codecs.read_json(ctx.store.get(ctx.key(paths.VALIDATION_REPORT)))


def test_clean_data_passes_and_writes_report_and_data_docs(settings, small_df, caplog):
    ctx = _run(settings, small_df)
    with caplog.at_level(logging.INFO, logger="pipeline.validate"):
        result = validate.validate(ctx)
    assert result["success"] and result["failed"] == 0 and result["warnings"] == 0
    report = _report(ctx)
    assert report["success"] and len(report["expectations"]) == result["evaluated"] >= 10
    assert report["interval"] == {  # the CLI's midnight end, the default 02:00 schedule: from its last tick
        "start": "2025-03-31T02:00:00+00:00",
        "end": "2025-04-01T00:00:00+00:00",
        "events": 28,
    }
    assert {c["check"]: c["status"] for c in report["checks"]}["volume"] == "skip"  # no history yet
    assert result["data_docs_uri"].endswith(".html")
    assert (
        "<html"
        in ctx.store.get(ctx.key(paths.DATA_DOCS, result["data_docs_uri"].split("/data_docs/", 1)[1])).decode().lower()
    )
    # the task log: a short table (check, severity, result, observed) and where the HTML is
    log = caplog.text
    assert "check" in log and "severity" in log and "observed" in log
    assert "duplicates" in log and "blocking" in log and "empty_interval" in log
    assert "Data Docs (HTML): " + result["data_docs_uri"] in log
    assert _excluded(ctx) == set()  # nothing filtered: features trains on every extracted event


def test_rerun_writes_identical_report_and_docs(settings, small_df):
    ctx = _run(settings, small_df)
    validate.validate(ctx)
    keys = ctx.store.list(f"tenants/acme/runs/{ctx.run_id}/validate/")
    first = {k: ctx.store.get(k) for k in keys if not k.endswith("result.json")}
    validate.validate(ctx)
    assert {k: ctx.store.get(k) for k in first} == first


def test_every_failed_expectation_is_named(settings, small_df):
    df = small_df.copy().astype({"user_id": "object", "item_id": "object", "timestamp": "object"})
    df.loc[0, "user_id"] = None  # null id
    df.loc[1, "item_id"] = "  "  # empty id after strip
    df.loc[2, "timestamp"] = 100  # 1970: implausible
    dup = df.iloc[-10:].copy()  # 10 repeats among the interval's 33 events (> 1% allowed)
    df = pd.concat([df, dup], ignore_index=True)
    df.loc[4, "rating"] = 11  # outside rating_range
    ctx = _run(settings, df, validation={"rating_range": [1, 5]})
    with pytest.raises(validate.ValidationFailed) as err:
        validate.validate(ctx)
    msg = str(err.value)
    assert "tenant acme" in msg
    for name in (
        "expect_column_values_to_not_be_null on user_id",
        "expect_column_value_lengths_to_be_between on item_id",
        "expect_column_values_to_be_between on timestamp",
        "expect_column_values_to_be_between on rating",
        "expect_compound_columns_to_be_unique on ['user_id', 'item_id', 'timestamp', 'event_type']",
    ):
        assert name in msg, name
    assert "20 of 38 events in the interval (52.63%) share (user_id, item_id, timestamp, event_type)" in msg
    assert "older than 1990-01-01T00:00:00Z" in msg and "1970-01-01T00:01:40Z" in msg
    assert "report.json" in msg
    report = _report(ctx)
    assert report["duplicate_rows"] == 10 and not report["success"]
    assert {f.split(":")[0] for f in report["failures"]} == {
        "not_null",
        "blank_ids",
        "old_timestamps",
        "rating_range",
        "duplicates",
    }


def test_too_few_rows_blocks(settings, small_df):
    ctx = _run(settings, small_df.head(20))
    with pytest.raises(validate.ValidationFailed, match="expect_table_row_count_to_be_between"):
        validate.validate(ctx)


def test_unparseable_timestamps_are_named_as_such(settings, small_df):
    df = small_df.astype({"timestamp": "object"})
    df.loc[:4, "timestamp"] = "yesterday"
    ctx = _run(settings, df)
    with pytest.raises(validate.ValidationFailed) as err:
        validate.validate(ctx)
    # one text value turns the column into text: extract cannot parse it, every timestamp is null
    assert "3,913 of 3,913 rows (100.00%) are null (timestamps that could not be parsed" in str(err.value)


def test_tenant_file_relaxes_and_adds_to_the_default_suite(settings, small_df):
    df = pd.concat([small_df, small_df.iloc[-10:]], ignore_index=True)  # interval duplicates
    path = _expectations(
        settings,
        "acme",
        {
            "duplicates": {"severity": "warning"},
            "row_count": {"min": 10},
            "expectations": [
                {
                    "type": "expect_column_values_to_match_regex",
                    "kwargs": {"column": "item_id", "regex": "^x"},
                    "severity": "warning",
                }
            ],
        },
    )
    ctx = _run(settings, df)
    result = validate.validate(ctx)
    assert result["success"] and result["warnings"] == 2
    report = _report(ctx)
    assert report["expectations_files"] == [str(path)]
    warned = {w.split(":")[0] for w in report["warnings"]}
    assert warned == {"duplicates", "expectations[0]"}
    assert any("expect_column_values_to_match_regex on item_id" in w for w in report["warnings"])
    # the tenant's `validation:` shorthands still apply, and its file wins over them
    spec, _, _ = load_suite_config(ctx.config, settings.expectations_dir)
    assert spec.row_count.min == 10 and spec.duplicates.severity == "warning"


def test_default_file_is_a_deployment_wide_layer_and_can_disable_a_check(settings, small_df):
    _expectations(settings, "_default", {"empty_interval": {"enabled": False}, "volume": {"window": 3}})
    ctx = _run(settings, small_df, end=END + timedelta(days=30))  # nothing in the interval
    result = validate.validate(ctx)
    assert result["success"] and result["warnings"] == 0
    checks = {c["check"]: c for c in _report(ctx)["checks"]}
    assert checks["empty_interval"]["status"] == "skip" and checks["empty_interval"]["observed"] == "disabled"


def test_shipped_default_suite_file_equals_the_built_in_defaults():
    raw = yaml.safe_load((ROOT / "include" / "expectations" / "_default.yaml").read_text())
    assert SuiteConfig.model_validate(raw) == SuiteConfig()
    example = yaml.safe_load((ROOT / "include" / "expectations" / "demo.yaml").read_text())
    SuiteConfig.model_validate(example)  # the example tenant file is valid


@pytest.mark.parametrize(
    ("doc", "field", "reason"),
    [
        ({"duplicates": {"severity": "fatal"}}, "duplicates.severity", "'blocking' or 'warning'"),
        ({"duplicates": {"max_fraction": 2}}, "duplicates.max_fraction", "less than or equal to 1"),
        ({"dupes": {"max_fraction": 0.1}}, "dupes", "Extra inputs are not permitted"),
        ({"rating_range": {"min": 5, "max": 1}}, "rating_range", "greater than max"),
        ("- a list\n", "(file)", "expected a mapping"),
        ("duplicates: {max_fraction: [\n", "(file)", "not valid YAML"),
    ],
)
def test_invalid_expectations_file_names_file_field_and_reason(settings, small_df, doc, field, reason):
    path = _expectations(settings, "acme", doc)
    ctx = _run(settings, small_df)
    with pytest.raises(ExpectationsFileError) as err:
        validate.validate(ctx)
    msg = str(err.value)
    assert str(path) in msg and reason in msg
    if field != "(file)":
        assert f"field {field!r}" in msg


def test_invalid_gx_expectation_names_file_and_entry(settings, small_df):
    path = _expectations(
        settings, "acme", {"expectations": [{"type": "expect_column_values_to_be_fabulous", "kwargs": {"column": "x"}}]}
    )
    ctx = _run(settings, small_df)
    with pytest.raises(ExpectationsFileError) as err:
        validate.validate(ctx)
    assert str(path) in str(err.value) and "field 'expectations.0' (expect_column_values_to_be_fabulous)" in str(
        err.value
    )


def test_interval_comes_from_airflow_or_the_schedule():
    from pipeline.config import TenantConfig

    cfg = TenantConfig(tenant="acme", source={"uri": "x.csv"}, schedule="0 0 * * 1")  # weekly, Mondays
    monday = datetime(2025, 3, 31, tzinfo=UTC)
    assert validate.interval_of(RunContext(config=cfg, interval_end=monday, store=object()))[0] == pd.Timestamp(
        "2025-03-24", tz="UTC"
    )
    start = datetime(2025, 3, 30, 12, tzinfo=UTC)
    got = validate.interval_of(RunContext(config=cfg, interval_end=monday, interval_start=start, store=object()))
    assert got == (pd.Timestamp(start), pd.Timestamp(monday))
    daily = cfg.model_copy(update={"schedule": "0 2 * * *"})  # a CLI end off the cron: from the previous tick
    assert validate.interval_of(RunContext(config=daily, interval_end=monday, store=object()))[0] == pd.Timestamp(
        "2025-03-30T02:00", tz="UTC"
    )


def test_event_types_future_timestamps_and_weights_when_extract_has_them(settings, small_df):
    frame = _canonical(small_df)
    frame["event_type"] = "view"
    frame["weight"] = 1.0
    frame.loc[frame.index[-3:], "event_type"] = "hover"
    frame.loc[frame.index[-1], "weight"] = -2.0
    late = frame.iloc[-2:].assign(timestamp=pd.Timestamp(END) + pd.Timedelta(days=2))
    ctx = _with_extract(settings, small_df, pd.concat([frame, late], ignore_index=True))
    with pytest.raises(validate.ValidationFailed) as err:
        validate.validate(ctx)
    msg = str(err.value)
    assert "5 of 3,915 events (0.13%) have an event type outside" in msg and "'hover': 5" in msg
    assert "2 of 3,915 events (0.05%) are stamped after 2025-04-01T01:00:00Z" in msg
    assert "latest 2025-04-03T00:00:00Z" in msg
    assert "weight_range [blocking]" in msg


def test_bot_is_flagged_and_optionally_filtered(settings, small_df):
    hour = pd.Timestamp(END) - pd.Timedelta(hours=5)
    bot = pd.DataFrame(
        {
            "user_id": "bot-7",
            "item_id": [f"i{i % 120}" for i in range(1500)],
            "timestamp": [int(hour.timestamp()) + i * 2 for i in range(1500)],
            "rating": 3.0,
        }
    )
    df = pd.concat([small_df, bot], ignore_index=True)
    ctx = _run(settings, df)
    result = validate.validate(ctx)  # a warning by default: reported, the run goes on
    assert result["success"] and result["warnings"] == 1
    [warning] = _report(ctx)["warnings"]
    assert "1 user(s) with more than 1,000 events in one hour (bot-like): bot-7 (1,500 events" in warning
    assert _excluded(ctx) == set()

    _expectations(settings, "acme", {"bot_users": {"filter": True}})
    result = validate.validate(ctx)
    assert result["filtered_rows"] == 1500 and result["excluded_users"] == 1
    assert "their 1,500 events are removed from the table downstream reads" in _report(ctx)["warnings"][0]
    assert _excluded(ctx) == {"bot-7"}
    features.features(ctx)  # the features stage drops the excluded users' events
    assert "bot-7" not in set(ctx.read_parquet(paths.USERS)["user_id"])
    assert len(ctx.read_parquet(paths.EVENTS)) == len(small_df)

    _expectations(settings, "acme", {"bot_users": {"filter": False, "severity": "blocking"}})
    with pytest.raises(validate.ValidationFailed, match="bot_users"):
        validate.validate(ctx)
    assert _excluded(ctx) == set()  # no stale list from the earlier run of the interval


def test_unknown_catalog_items_are_reported(settings, small_df):
    last_day = small_df["timestamp"] >= pd.Timestamp("2025-03-31", tz="UTC").timestamp()
    retired = sorted(set(small_df.loc[last_day, "item_id"]))[:3]
    items = sorted(set(small_df["item_id"]) - set(retired))
    catalog = settings.data_root / "items.csv"
    pd.DataFrame({"item_id": items}).to_csv(catalog, index=False)
    ctx = _run(settings, small_df, catalog={"uri": str(catalog)})
    result = validate.validate(ctx)
    assert result["success"] and result["warnings"] == 1
    [warning] = _report(ctx)["warnings"]
    assert warning.startswith("unknown_items: ") and "events in the interval" in warning
    assert "are on items not in the catalog" in warning and f"'{retired[0]}'" in warning

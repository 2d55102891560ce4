from datetime import UTC, datetime

import pandas as pd
import pytest

from pipeline import extract, validate
from pipeline.context import RunContext
from pipeline.storage import codecs
from tests.conftest import write_tenant

END = datetime(2025, 6, 1, tzinfo=UTC)


def _run(settings, df, **overrides):
    cfg = write_tenant(settings, "acme", df, **overrides)
    ctx = RunContext(config=cfg, interval_end=END, settings=settings)
    extract.extract(ctx)
    return ctx


def test_clean_data_passes_and_writes_report_and_data_docs(settings, small_df):
    ctx = _run(settings, small_df)
    result = validate.validate(ctx)
    assert result["success"] and result["failed"] == 0
    report = codecs.read_json(ctx.store.get(ctx.key("validate", "report.json")))
    assert report["success"] and len(report["expectations"]) == result["evaluated"] >= 10
    assert result["data_docs_uri"].endswith(".html")
    assert (
        "<html"
        in ctx.store.get(ctx.key("validate", result["data_docs_uri"].split("/validate/", 1)[1])).decode().lower()
    )


def test_every_failed_expectation_is_named(settings, small_df):
    df = small_df.copy().astype({"user_id": "object", "item_id": "object", "timestamp": "object"})
    df.loc[0, "user_id"] = None  # null id
    df.loc[1, "item_id"] = "  "  # empty id after strip
    df.loc[2, "timestamp"] = 100  # 1970: implausible
    dup = df.iloc[3:60].copy()  # ~1.5% duplicates (> 1% allowed)
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
        "expect_compound_columns_to_be_unique on ['user_id', 'item_id', 'timestamp']",
    ):
        assert name in msg, name
    assert "report.json" in msg
    report = codecs.read_json(ctx.store.get(ctx.key("validate", "report.json")))
    assert report["duplicate_rows"] == 57 and not report["success"]


def test_too_few_rows_blocks(settings, small_df):
    ctx = _run(settings, small_df.head(20))
    with pytest.raises(validate.ValidationFailed, match="expect_table_row_count_to_be_between"):
        validate.validate(ctx)

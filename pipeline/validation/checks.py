"""The checks of the validation suite as GX 1.x expectations, and what each one says when it fails.

`build(...)` turns the tenant's `SuiteConfig` into GX expectations tagged with their check
(`meta.check`) and severity (GX `severity`: critical = blocking, warning = warning); `summarise`
turns the results back into one outcome per check, in words a data engineer reads: what was
observed, what is allowed, examples.

What GX sees (the batch) is the rows this run read from the source: timestamp >= extract's
window start, or no timestamp. The history before the window was validated by the runs that
wrote it (a first run reads everything), and a nightly run checks days, not years, of rows.
* row checks (schema, nulls, blank ids, ranges, event types, old or future timestamps) cover
  the whole batch;
* rate checks (duplicates, unknown items, bots, empty interval, volume) cover the events of the
  data interval [start, end) (a GX row condition), so a bad day is not diluted by the days
  around it;
* `row_count` counts the whole table extract hands over (validate counts it: see `external`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.config.expectations import SuiteConfig

KEY_COLUMNS = ["user_id", "item_id", "timestamp"]
# pandas types after extract, as GX's expect_column_values_to_be_of_type names them
TYPES = {
    "user_id": "str",
    "item_id": "str",
    "timestamp": "Timestamp",
    "rating": "float64",
    "event_type": "str",
    "weight": "float64",
}
USER_HOUR = "_user_hour_events"  # derived: the user's events in that clock hour (interval rows only)
IN_CATALOG = "_item_in_catalog"  # derived: the item is in the tenant's catalog
EXTRACT_DROPPED_FUTURE = "extract_dropped_after_interval_end"  # not a GX expectation: extract's own count
ORDER = [
    "schema",
    "not_null",
    "blank_ids",
    "row_count",
    "rating_range",
    "weight_range",
    "old_timestamps",
    "future_timestamps",
    "event_types",
    "duplicates",
    "empty_interval",
    "volume",
    "bot_users",
    "unknown_items",
]


@dataclass
class Frame:
    """What the checks need to know about the data and the run."""

    columns: list[str]
    start: pd.Timestamp  # the data interval
    end: pd.Timestamp
    read_since: pd.Timestamp | None  # extract's window start: the batch's rows (None: every row)
    has_rating: bool
    has_catalog: bool
    event_types: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)  # previous runs: {run_id, events}


def utc(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts if pd.isna(ts) else (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC"))


def _fmt_ts(ts: Any) -> str:
    ts = utc(ts)
    return "null" if pd.isna(ts) else ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def volume_floor(history: list[dict[str, Any]], spec) -> tuple[float | None, int | None, str]:
    """(median of previous interval volumes, the smallest volume allowed, why skipped or '')."""
    if len(history) < spec.min_history:
        return None, None, f"{len(history)} previous run(s) in the window, {spec.min_history} needed"
    median = float(pd.Series([h["events"] for h in history]).median())
    if median <= 0:
        return median, None, "the previous runs' median is 0 events"
    return median, math.ceil(median * (1 - spec.max_drop)), ""


def check_config(spec: SuiteConfig, name: str):
    return spec.schema_ if name == "schema" else getattr(spec, name)


def build(spec: SuiteConfig, frame: Frame, origins: list[str]) -> tuple[list[Any], dict[str, str]]:
    """GX expectations for the enabled, applicable checks; and {check: why skipped} for the others."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    cols = set(frame.columns)
    ts = Column("timestamp")
    interval = {"row_condition": (ts >= frame.start) & (ts < frame.end)}
    exps: list[Any] = []
    skipped: dict[str, str] = {}

    def add(check: str, exp_cls, description: str, severity: str | None = None, **kwargs) -> None:
        severity = severity or check_config(spec, check).severity
        exps.append(
            exp_cls(
                **kwargs,
                meta={"check": check},
                severity="critical" if severity == "blocking" else "warning",
                description=description,
            )
        )

    def on(check: str) -> Any:
        c = check_config(spec, check)
        if not c.enabled:
            skipped[check] = "disabled"
            return None
        return c

    required = KEY_COLUMNS + (["rating"] if frame.has_rating else [])
    present = [c for c in [*required, "event_type", "weight"] if c in cols]
    on("row_count")  # counted by validate on the whole table (validation_report.external), not by GX
    if on("schema"):
        for col in required:
            add("schema", E.ExpectColumnToExist, f"column {col} is present", column=col)
        for col in present:
            add("schema", E.ExpectColumnValuesToBeOfType, f"{col} is {TYPES[col]}", column=col, type_=TYPES[col])
    if on("not_null"):
        for col in present:
            add("not_null", E.ExpectColumnValuesToNotBeNull, f"no null {col}", column=col)
    if on("blank_ids"):
        for col in ("user_id", "item_id"):
            if col in cols:
                add(
                    "blank_ids",
                    E.ExpectColumnValueLengthsToBeBetween,
                    f"no empty {col}",
                    column=col,
                    min_value=1,
                )
    for name, col, applies in (
        ("rating_range", "rating", frame.has_rating and "rating" in cols),
        ("weight_range", "weight", "weight" in cols),
    ):
        if c := on(name):
            if not applies:
                skipped[name] = f"no {col} column"
            elif c.min is None and c.max is None:
                skipped[name] = "no bounds set"
            else:
                add(
                    name,
                    E.ExpectColumnValuesToBeBetween,
                    f"{col} within [{c.min}, {c.max}]",
                    column=col,
                    min_value=c.min,
                    max_value=c.max,
                )
    if "timestamp" in cols:
        if c := on("old_timestamps"):
            low = pd.Timestamp(c.min)
            add(
                "old_timestamps",
                E.ExpectColumnValuesToBeBetween,
                f"no timestamp before {_fmt_ts(low)}",
                column="timestamp",
                min_value=low,
            )
        if c := on("future_timestamps"):
            high = frame.end + pd.Timedelta(hours=c.max_skew_hours)
            add(
                "future_timestamps",
                E.ExpectColumnValuesToBeBetween,
                f"no timestamp after the interval end + {c.max_skew_hours:g} h ({_fmt_ts(high)})",
                column="timestamp",
                max_value=high,
            )
    if on("event_types"):
        if "event_type" not in cols:
            skipped["event_types"] = "no event_type column"
        else:
            add(
                "event_types",
                E.ExpectColumnValuesToBeInSet,
                f"event types in {frame.event_types}",
                column="event_type",
                value_set=frame.event_types,
            )
    if c := on("duplicates"):
        key = KEY_COLUMNS + (["event_type"] if "event_type" in cols else [])
        add(
            "duplicates",
            E.ExpectCompoundColumnsToBeUnique,
            f"at most {c.max_fraction:.2%} of the interval's events share ({', '.join(key)}) with another",
            column_list=key,
            mostly=1 - c.max_fraction,
            **interval,
        )
    if on("empty_interval"):
        add(
            "empty_interval",
            E.ExpectTableRowCountToBeBetween,
            f"events in the data interval [{_fmt_ts(frame.start)}, {_fmt_ts(frame.end)})",
            min_value=1,
            **interval,
        )
    if c := on("volume"):
        median, floor, why = volume_floor(frame.history, c)
        if floor is None:
            skipped["volume"] = why
        else:
            add(
                "volume",
                E.ExpectTableRowCountToBeBetween,
                f"at least {floor:,} events in the interval: {1 - c.max_drop:.0%} of the median ({median:,.0f}) "
                f"of the previous {len(frame.history)} runs",
                min_value=floor,
                **interval,
            )
    if c := on("bot_users"):
        add(
            "bot_users",
            E.ExpectColumnValuesToBeBetween,
            f"no user with more than {c.max_events_per_hour:,} events in one hour",
            severity="warning" if c.filter else c.severity,
            column=USER_HOUR,
            max_value=c.max_events_per_hour,
            **interval,
        )
    if c := on("unknown_items"):
        if not frame.has_catalog:
            skipped["unknown_items"] = "the tenant has no catalog"
        else:
            add(
                "unknown_items",
                E.ExpectColumnValuesToBeInSet,
                f"at most {c.max_fraction:.2%} of the interval's events on items not in the catalog",
                column=IN_CATALOG,
                value_set=[True],
                mostly=1 - c.max_fraction,
                **interval,
            )
    exps += extra_expectations(spec, origins)
    return exps, skipped


def extra_expectations(spec: SuiteConfig, origins: list[str]) -> list[Any]:
    """The tenant's own GX expectations (`expectations:`), checked by GX itself."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
    from great_expectations.expectations.metadata_types import FailureSeverity

    out = []
    for i, x in enumerate(spec.expectations):
        try:
            out.append(
                ExpectationConfiguration(
                    type=x.type,
                    kwargs=dict(x.kwargs),
                    meta={"check": f"expectations[{i}]"},
                    severity=FailureSeverity.CRITICAL if x.severity == "blocking" else FailureSeverity.WARNING,
                    description=x.description,
                ).to_domain_obj()
            )
        except Exception as exc:  # unknown type, missing or wrong kwargs: GX's own words
            from pipeline.config.expectations import ExpectationsFileError

            source = origins[i] if i < len(origins) else "the suite"
            raise ExpectationsFileError(
                f"invalid expectations in {source}:\n"
                f"  field 'expectations.{origins[:i].count(source)}' ({x.type}): {str(exc).splitlines()[0]}"
            ) from None
    return out

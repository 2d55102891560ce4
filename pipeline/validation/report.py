"""Validation results in words: one outcome per check, the task log's table, the failure lines.

`describe` turns a GX expectation result into plain JSON-able data (report.json's
`expectations`); `external` shapes the checks validate evaluates itself the same way;
`summarise` groups them into one `Outcome` per check with what was observed, what is allowed
and examples, so a data engineer can act without opening the Data Docs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd

from pipeline.config.expectations import SuiteConfig
from pipeline.validation.checks import EXTRACT_DROPPED_FUTURE, ORDER, _fmt_ts, check_config

_NULL_HINT = {
    "timestamp": " (timestamps that could not be parsed become null at extract: check the format/unit)",
    "rating": " (non-numeric ratings become null at extract)",
}


@dataclass
class Outcome:
    check: str
    severity: str  # blocking | warning
    status: str  # pass | fail | warn | skip
    observed: str
    message: str = ""
    expectations: list[str] = field(default_factory=list)


def external(
    check: str, severity: str, expectation: str, description: str, success: bool, **result: Any
) -> dict[str, Any]:
    """A check evaluated by validate itself (on what GX does not see), shaped like `describe`."""
    return {
        "check": check,
        "severity": severity,
        "expectation": expectation,
        "description": description,
        "column": None,
        "kwargs": result.pop("kwargs", {}),
        "success": success,
        "observed_value": result.pop("observed_value", None),
        "element_count": result.pop("element_count", None),
        "unexpected_count": result.pop("unexpected_count", None),
        "unexpected_percent": None,
        "partial_unexpected_list": [],
        "partial_unexpected_index_list": [],
        "exception": None,
    }


def _short(value: Any) -> str:
    """An example value as text: rows as user/item@time, timestamps in ISO."""
    if isinstance(value, dict):
        parts = {k: _short(v) for k, v in value.items()}
        if {"user_id", "item_id", "timestamp"} <= set(parts):
            extra = [v for k, v in parts.items() if k not in ("user_id", "item_id", "timestamp")]
            head = f"{parts['user_id']}/{parts['item_id']}@{parts['timestamp']}"
            return head + (f" ({', '.join(extra)})" if extra else "")
        return str(parts)
    if isinstance(value, pd.Timestamp | datetime):
        return _fmt_ts(value)
    return str(value)


def describe(result) -> dict[str, Any]:
    """One GX expectation result as plain JSON-able data (the report's `expectations`)."""
    cfg = result.expectation_config
    res = result.result or {}
    exc = result.exception_info or {}
    kwargs = cfg.to_json_dict().get("kwargs", {})
    return {
        "check": (cfg.meta or {}).get("check"),
        "severity": "warning" if str(getattr(cfg.severity, "value", cfg.severity)) == "warning" else "blocking",
        "expectation": cfg.type,
        "description": cfg.description,
        "column": cfg.kwargs.get("column") or cfg.kwargs.get("column_list"),
        "kwargs": {k: v for k, v in kwargs.items() if k not in ("column", "column_list", "batch_id")},
        "success": bool(result.success),
        "observed_value": res.get("observed_value"),
        "element_count": res.get("element_count"),
        "unexpected_count": res.get("unexpected_count"),
        "unexpected_percent": res.get("unexpected_percent"),
        "partial_unexpected_list": [_short(x) for x in (res.get("partial_unexpected_list") or [])[:5]],
        "partial_unexpected_index_list": [_short(x) for x in (res.get("partial_unexpected_index_list") or [])[:5]],
        "exception": exc.get("exception_message") if exc.get("raised_exception") else None,
    }


def _where(e: dict[str, Any]) -> str:
    return f"{e['expectation']}" + (f" on {e['column']}" if e["column"] else "")


def _rows(e: dict[str, Any], what: str = "rows") -> str:
    n, total = e["unexpected_count"] or 0, e["element_count"] or 0
    pct = 100.0 * n / total if total else 0.0
    return f"{n:,} of {total:,} {what} ({pct:.2f}%)"


def _examples(e: dict[str, Any], key: str = "partial_unexpected_list") -> str:
    xs = e[key]
    return f", e.g. {xs}" if xs else ""


def _failure_detail(check: str, e: dict[str, Any], stats: dict[str, Any]) -> str:
    """What a failed expectation of `check` means, with numbers and examples."""
    if e["exception"]:
        return f"could not be evaluated: {e['exception']}"
    kw, col = e["kwargs"], e["column"]
    if check == "schema" and e["expectation"] == "expect_column_to_exist":
        return f"column {col!r} is missing from the extract"
    if check == "schema":
        return f"column {col!r} has type {e['observed_value']}, expected {kw.get('type_')}"
    if check == "not_null":
        return f"{_rows(e)} are null{_NULL_HINT.get(col, '')}"
    if check == "blank_ids":
        return f"{_rows(e)} have an empty {col}"
    if check == "row_count":
        return f"{e['observed_value']:,} rows, at least {kw.get('min_value'):,} required"
    if check in ("rating_range", "weight_range"):
        return f"{_rows(e)} outside [{kw.get('min_value')}, {kw.get('max_value')}]{_examples(e)}"
    if check == "old_timestamps":
        return f"{_rows(e, 'events')} are older than {_fmt_ts(kw['min_value'])} (implausible){_examples(e)}"
    if check == "future_timestamps" and e["expectation"] == EXTRACT_DROPPED_FUTURE:
        return (
            f"{e['unexpected_count']:,} events in this interval's own source partitions are stamped at or after "
            f"the interval end {_fmt_ts(stats['end'])} (extract dropped them): a clock or time-zone problem "
            "upstream, or rows written to the wrong partition?"
        )
    if check == "future_timestamps":
        return (
            f"{_rows(e, 'events')} are stamped after {_fmt_ts(kw['max_value'])} (the interval end "
            f"{_fmt_ts(stats['end'])} + the allowed skew), latest {stats.get('max_timestamp')}: "
            "a clock or time-zone problem upstream?"
        )
    if check == "event_types":
        return (
            f"{_rows(e, 'events')} have an event type outside {kw.get('value_set')}: {stats.get('bad_event_types')} "
            "(set event_types.allowed in the tenant's expectations file, or map them in source.event_types)"
        )
    if check == "duplicates":
        return (
            f"{_rows(e, 'events in the interval')} share ({', '.join(col)}) with another event; at most "
            f"{100 * (1 - kw.get('mostly', 1)):.2f}% allowed{_examples(e)}"
        )
    if check == "empty_interval":
        return f"no events in the data interval [{_fmt_ts(stats['start'])}, {_fmt_ts(stats['end'])})"
    if check == "volume":
        v = stats["volume"]
        return (
            f"{e['observed_value']:,} events in [{_fmt_ts(stats['start'])}, {_fmt_ts(stats['end'])}), "
            f"{v['change']:+.0%} vs the median of the previous {v['runs']} runs ({v['median']:,.0f} events); "
            f"a drop of at most {v['max_drop']:.0%} is allowed (>= {kw.get('min_value'):,} events)"
        )
    if check == "bot_users":
        bots = stats.get("bots", [])
        shown = ", ".join(f"{b['user_id']} ({b['events']:,} events in the hour from {b['hour']})" for b in bots[:5])
        more = f" and {len(bots) - 5} more" if len(bots) > 5 else ""
        limit = int(kw.get("max_value"))
        out = f"{len(bots)} user(s) with more than {limit:,} events in one hour (bot-like): {shown}{more}"
        if stats.get("filtered_rows"):
            out += f"; their {stats['filtered_rows']:,} events are removed from the table downstream reads"
        return out
    if check == "unknown_items":
        return (
            f"{_rows(e, 'events in the interval')} are on items not in the catalog; at most "
            f"{100 * (1 - kw.get('mostly', 1)):.2f}% allowed, e.g. {stats.get('unknown_items')}"
        )
    if e["unexpected_count"] is not None:
        return f"{_rows(e)} unexpected{_examples(e)}"
    return f"observed {e['observed_value']!r}, expected {kw}"


def _observed(check: str, es: list[dict[str, Any]], stats: dict[str, Any]) -> str:
    """A short observed value for the log table."""
    bad = sum(e["unexpected_count"] or 0 for e in es)
    if check == "schema":
        return f"{len([e for e in es if e['expectation'] == 'expect_column_to_exist'])} required columns"
    if check in ("row_count", "empty_interval"):
        v = es[0]["observed_value"]
        return f"{v:,} {'rows' if check == 'row_count' else 'interval events'}" if v is not None else "?"
    if check == "volume":
        v = stats["volume"]
        return f"{es[0]['observed_value']:,} vs median {v['median']:,.0f} ({v['change']:+.0%})"
    if check == "bot_users":
        return f"peak {stats.get('peak_user_hour', 0):,}/h"
    if check in ("duplicates", "unknown_items"):
        e = es[0]
        return f"{bad:,} ({(e['unexpected_percent'] or 0):.2f}%)"
    words = {
        "not_null": "null",
        "blank_ids": "empty ids",
        "rating_range": "outside",
        "weight_range": "outside",
        "old_timestamps": "too old",
        "future_timestamps": "in the future",
        "event_types": "unknown",
    }
    out = f"{bad:,} {words.get(check, 'unexpected')}"
    if check == "event_types" and stats.get("extract_dropped_event_types"):
        out += f" (extract dropped {stats['extract_dropped_event_types']})"
    return out


def summarise(described: list[dict[str, Any]], spec: SuiteConfig, skipped: dict[str, str], stats: dict[str, Any]):
    """One Outcome per check (in suite order, then the tenant's own expectations)."""
    by_check: dict[str, list[dict[str, Any]]] = {}
    for e in described:
        by_check.setdefault(e["check"], []).append(e)
    names = [n for n in ORDER if n in by_check or n in skipped] + sorted(
        (n for n in by_check if n not in ORDER), key=lambda n: int(n.split("[")[1].rstrip("]"))
    )
    out = []
    for name in names:
        if name in skipped:
            sev = check_config(spec, name).severity
            out.append(Outcome(name, sev, "skip", skipped[name]))
            continue
        es = by_check[name]
        severity = "blocking" if any(e["severity"] == "blocking" for e in es) else "warning"
        failed = [e for e in es if not e["success"]]
        status = "pass" if not failed else ("fail" if any(e["severity"] == "blocking" for e in failed) else "warn")
        observed = _observed(name, es, stats) if name in ORDER else ("ok" if not failed else "failed")
        message = "; ".join(f"{_where(e)}: {_failure_detail(name, e, stats)}" for e in failed)
        out.append(Outcome(name, severity, status, observed, message, [e["expectation"] for e in es]))
    return out


def table(outcomes: list[Outcome]) -> str:
    """The short table the task log prints."""
    rows = [("check", "severity", "result", "observed")] + [
        (o.check, o.severity, {"pass": "ok", "fail": "FAIL", "warn": "WARN", "skip": "skip"}[o.status], o.observed)
        for o in outcomes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)

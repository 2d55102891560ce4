"""validate: a Great Expectations 1.x suite built in code from the tenant config.

Writes `validate/report.json` (every expectation, observed values, counts) and GX Data Docs
HTML under `validate/data_docs/`, then raises naming every failed expectation, so nothing
downstream runs on bad data.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import extract
from pipeline.context import RunContext
from pipeline.storage import codecs

STAGE = "validate"
KEY_COLUMNS = ["user_id", "item_id", "timestamp"]


class ValidationFailed(RuntimeError):
    """Blocking expectations failed; the message lists each one."""


def build_suite(ctx: RunContext):
    """The expectation suite for this tenant (GX objects; gx imported lazily: it is slow)."""
    import great_expectations as gx

    E = gx.expectations
    v = ctx.config.validation
    has_rating = ctx.config.source.columns.rating is not None
    required = KEY_COLUMNS + (["rating"] if has_rating else [])
    exps: list[Any] = [E.ExpectColumnToExist(column=c) for c in required]
    exps += [E.ExpectColumnValuesToNotBeNull(column=c) for c in required]
    exps += [E.ExpectColumnValueLengthsToBeBetween(column=c, min_value=1) for c in ("user_id", "item_id")]
    exps.append(
        E.ExpectColumnValuesToBeBetween(
            column="timestamp",
            min_value=pd.Timestamp(v.min_timestamp),
            max_value=pd.Timestamp(ctx.interval_end),
        )
    )
    if has_rating and v.rating_range is not None:
        exps.append(
            E.ExpectColumnValuesToBeBetween(column="rating", min_value=v.rating_range[0], max_value=v.rating_range[1])
        )
    exps.append(E.ExpectCompoundColumnsToBeUnique(column_list=KEY_COLUMNS, mostly=1.0 - v.max_duplicate_fraction))
    exps.append(E.ExpectTableRowCountToBeBetween(min_value=v.min_rows))
    return gx.ExpectationSuite(name=f"recsys_{ctx.tenant}_interactions", expectations=exps)


def _describe(result) -> dict[str, Any]:
    cfg = result.expectation_config
    res = result.result or {}
    exc = result.exception_info or {}
    return {
        "expectation": cfg.type,
        "column": cfg.kwargs.get("column") or cfg.kwargs.get("column_list"),
        "kwargs": {k: v for k, v in cfg.kwargs.items() if k not in ("column", "column_list", "batch_id")},
        "success": bool(result.success),
        "observed_value": res.get("observed_value"),
        "element_count": res.get("element_count"),
        "unexpected_count": res.get("unexpected_count"),
        "unexpected_percent": res.get("unexpected_percent"),
        "partial_unexpected_list": [str(x) for x in (res.get("partial_unexpected_list") or [])[:5]],
        "exception": exc.get("exception_message") if exc.get("raised_exception") else None,
    }


def _failure_line(e: dict[str, Any]) -> str:
    where = f" on {e['column']}" if e["column"] else ""
    if e["exception"]:
        return f"{e['expectation']}{where}: could not be evaluated: {e['exception']}"
    if e["unexpected_count"] is not None:
        sample = f", e.g. {e['partial_unexpected_list']}" if e["partial_unexpected_list"] else ""
        return (
            f"{e['expectation']}{where}: {e['unexpected_count']} of {e['element_count']} rows "
            f"({e['unexpected_percent']:.2f}%) unexpected{sample}"
        )
    return f"{e['expectation']}{where}: observed {e['observed_value']!r}, expected {e['kwargs']}"


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_STAMP = re.compile(r"\d{8}T\d{6}\.\d{6}Z")


def _deterministic(page: bytes, run_time: str) -> bytes:
    """GX stamps pages with the wall clock and random element ids; pin both so a rerun of
    the interval writes byte-identical reports."""
    ids: dict[str, str] = {}
    text = _UUID.sub(
        lambda m: ids.setdefault(m.group(0), f"00000000-0000-0000-0000-{len(ids):012d}"), page.decode("utf-8")
    )
    return _STAMP.sub(run_time, text).encode("utf-8")


def _publish_docs(ctx: RunContext, docs_dir: Path) -> str | None:
    """Upload the Data Docs pages (not the 4 MB of fonts/images they can live without).

    Returns the key of the validation page."""
    index = None
    run_time = ctx.interval_end.strftime("%Y%m%dT%H%M%S.%fZ")
    for path in sorted(docs_dir.rglob("*")):
        rel = path.relative_to(docs_dir).as_posix()
        if not path.is_file() or rel.startswith(("static/fonts/", "static/images/")):
            continue
        key = ctx.key(STAGE, f"data_docs/{rel}")
        data = path.read_bytes()
        ctx.store.put(key, _deterministic(data, run_time) if path.suffix in (".html", ".json") else data)
        if rel.startswith("validations/") and rel.endswith(".html"):
            index = key
    return index


def validate(ctx: RunContext) -> dict[str, Any]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    log = ctx.logger(STAGE)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # it logs hundreds of INFO lines
    df = extract.load(ctx)
    gctx = gx.get_context(mode="ephemeral")
    gctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        gctx.data_sources.add_pandas("tenant")
        .add_dataframe_asset("interactions")
        .add_batch_definition_whole_dataframe("extract")
    )
    suite = gctx.suites.add(build_suite(ctx))
    vd = gctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"{ctx.tenant}_interactions", data=batch, suite=suite)
    )
    # run_time = interval end (not now) keeps report paths identical on reruns
    res = vd.run(
        batch_parameters={"dataframe": df}, run_id=RunIdentifier(run_name=ctx.run_id, run_time=ctx.interval_end)
    )
    checks = [_describe(r) for r in res.results]
    failed = [c for c in checks if not c["success"]]
    duplicates = int(df.duplicated(KEY_COLUMNS).sum())
    with tempfile.TemporaryDirectory(prefix="recsys-gx-") as tmp:
        gctx.add_data_docs_site(
            "run",
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": tmp},
            },
        )
        gctx.build_data_docs(site_names=["run"])
        docs_key = _publish_docs(ctx, Path(tmp))
        docs_uri = ctx.store.uri(docs_key) if docs_key else None
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "tenant": ctx.tenant,
        "run_id": ctx.run_id,
        "success": bool(res.success),
        "rows": len(df),
        "duplicate_rows": duplicates,
        "statistics": dict(res.statistics),
        "expectations": checks,
        "data_docs": docs_uri,
        "data_docs_key": docs_key,
    }
    report_key = ctx.key(STAGE, "report.json")
    ctx.store.put(report_key, codecs.json_bytes(report))
    for c in checks:
        log.info(
            "%-4s %s",
            "ok" if c["success"] else "FAIL",
            _failure_line(c)
            if not c["success"]
            else f"{c['expectation']}{' on ' + str(c['column']) if c['column'] else ''}",
        )
    log.info("validation report: %s; Data Docs: %s", ctx.store.uri(report_key), docs_uri)
    result = {
        "success": report["success"],
        "evaluated": len(checks),
        "failed": len(failed),
        "duplicate_rows": duplicates,
        "report_uri": ctx.store.uri(report_key),
        "data_docs_uri": docs_uri,
    }
    ctx.write_result(STAGE, result)
    if failed:
        lines = "\n  - ".join(_failure_line(c) for c in failed)
        raise ValidationFailed(
            f"[tenant {ctx.tenant}, run {ctx.run_id}] validation failed: {len(failed)} of {len(checks)} "
            f"expectations on {extract.OUTPUT}:\n  - {lines}\nreport: {ctx.store.uri(report_key)}"
        )
    return result

"""Great Expectations 1.x, run on one batch: an ephemeral context, the suite, Data Docs.

The validate stage builds the expectations (pipeline/validation/checks.py) and the batch;
this module only runs GX and publishes its HTML deterministically.
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

from pipeline.context import RunContext
from pipeline.storage import paths
from pipeline.validation.checks import KEY_COLUMNS

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
    """Upload the Data Docs pages (not the fonts/images they can live without).

    Returns the key of the validation page."""
    index = None
    run_time = ctx.interval_end.strftime("%Y%m%dT%H%M%S.%fZ")
    for path in sorted(docs_dir.rglob("*")):
        rel = path.relative_to(docs_dir).as_posix()
        if not path.is_file() or rel.startswith(("static/fonts/", "static/images/")):
            continue
        data = path.read_bytes()
        key = ctx.write(
            paths.DATA_DOCS, _deterministic(data, run_time) if path.suffix in (".html", ".json") else data, rel
        )
        if rel.startswith("validations/") and rel.endswith(".html"):
            index = key
    return index


def run_suite(ctx: RunContext, batch: pd.DataFrame, expectations: list[Any]) -> tuple[Any, str | None]:
    """Run the suite on `batch`; build and upload Data Docs. Returns (GX result, docs key)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # it logs hundreds of INFO lines
    gctx = gx.get_context(mode="ephemeral")
    gctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        gctx.data_sources.add_pandas("tenant")
        .add_dataframe_asset("interactions")
        .add_batch_definition_whole_dataframe("extract")
    )
    suite = gctx.suites.add(gx.ExpectationSuite(name=f"recsys_{ctx.tenant}_interactions", expectations=expectations))
    vd = gctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"{ctx.tenant}_interactions", data=batch_def, suite=suite)
    )
    index_cols = [c for c in KEY_COLUMNS if c in batch.columns]
    # run_time = interval end (not now) keeps report paths identical on reruns
    res = vd.run(
        batch_parameters={"dataframe": batch},
        run_id=RunIdentifier(run_name=ctx.run_id, run_time=ctx.interval_end),
        result_format={"result_format": "SUMMARY", "unexpected_index_column_names": index_cols},
    )
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
        shutil.rmtree(tmp, ignore_errors=True)
    return res, docs_key

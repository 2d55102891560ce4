"""The daily experiment report: impressions joined with attributed outcomes, analysed per user.

Reads the impression log (`tenants/{t}/impressions/`, by serving day) and the event log's
events that carry a `recommendation_id` (by arrival), both up to the report's end (the data
interval's end, never the clock), from the experiment's `start` (default: everything). An
outcome counts for the impression it names, so for that impression's user and arm; an event
naming another experiment's (or no known) response is not this experiment's. The report is
cumulative: the one for day D covers everything up to D's end, so the series of daily reports
is how the metrics moved (the dashboard's plots). Each is written to
`tenants/{t}/experiments/{name}/reports/{D}.json` (rerunning a day rewrites the same key) and
logged to MLflow (a failure there is reported, not raised).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import TenantConfig
from pipeline.config.experiments import ExperimentConfig
from pipeline.data import event_log
from pipeline.experiments import analysis
from pipeline.storage import ObjectStore, codecs, paths

log = logging.getLogger(__name__)
IMPRESSION_COLUMNS = ["recommendation_id", "user_id", "experiment", "variant", "items", "teams", "served_at"]


class ExperimentError(ValueError):
    """An unknown experiment, or a report that cannot be made; the message names tenant and experiment."""


def find(cfg: TenantConfig, name: str) -> ExperimentConfig:
    for e in cfg.live_experiments():
        if e.name == name:
            return e
    known = [e.name for e in cfg.live_experiments()] or "none"
    raise ExperimentError(f"tenant {cfg.tenant}: no experiment {name!r} in its config (experiments: {known})")


def unknown_releases(store: ObjectStore, cfg: TenantConfig) -> list[str]:
    """Arms pinned to a release the tenant does not have: one line per arm naming the field and
    the reason (the config loader cannot see the store; serving and the report call this)."""
    out = []
    for i, e in enumerate(cfg.experiments):
        for j, arm in enumerate(e.arms):
            rid = arm.pinned_release
            if rid is not None and not store.exists(paths.release_key(cfg.tenant, rid, "manifest.json")):
                out.append(
                    f"field 'experiments[{i}].arms[{j}].release': unknown release {rid!r} "
                    f"(no {paths.release_prefix(cfg.tenant, rid)}/manifest.json): arm {arm.name!r} is not served"
                )
    return out


def _day(key: str) -> str:
    part = key.rsplit("/", 2)[-2]
    return part[3:] if part.startswith("dt=") else ""


def read_impressions(store: ObjectStore, tenant: str, experiment: str, start: datetime | None, end: datetime):
    """The experiment's impressions served in [start, end)."""
    first = "" if start is None else start.strftime("%Y-%m-%d")
    last = end.strftime("%Y-%m-%d")
    keys = [k for k in sorted(store.list(paths.impressions_prefix(tenant) + "/")) if first <= _day(k) <= last]
    frames = [codecs.read_parquet(store.get(k)) for k in keys if k.endswith(".parquet")]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in IMPRESSION_COLUMNS})
    df = pd.concat(frames, ignore_index=True)
    keep = (df["experiment"] == experiment) & (df["served_at"] < pd.Timestamp(end))
    if start is not None:
        keep &= df["served_at"] >= pd.Timestamp(start)
    return df.loc[keep.fillna(False), IMPRESSION_COLUMNS].drop_duplicates("recommendation_id").reset_index(drop=True)


def read_outcomes(store: ObjectStore, tenant: str, start: datetime | None, end: datetime) -> pd.DataFrame:
    """Logged events that name a recommendation id, received in [start, end)."""
    ev = event_log.read(store, tenant, end, start)
    ev = ev[ev["recommendation_id"].notna()]
    return ev[["recommendation_id", "item_id", "event_type", "position"]].reset_index(drop=True)


def per_user(imps: pd.DataFrame, outcomes: pd.DataFrame, exp: ExperimentConfig) -> tuple[pd.DataFrame, int]:
    """One row per (user, arm): impressions, clicks, conversions; and how many outcomes were attributed."""
    joined = outcomes.merge(imps[["recommendation_id", "user_id", "variant"]], on="recommendation_id")
    kind = joined["event_type"].str.lower()
    joined = joined.assign(
        clicks=(kind == exp.outcome_event.lower()).astype(int),
        conversions=(kind == exp.conversion_event.lower()).astype(int),
    )
    # an impression is an item shown: CTR = clicks / items shown; `responses` counts the lists
    sized = imps.assign(impressions=imps["items"].str.len().fillna(0).astype(int), responses=1)
    shown = sized.groupby(["user_id", "variant"])[["impressions", "responses"]].sum()
    acted = joined.groupby(["user_id", "variant"])[["clicks", "conversions"]].sum()
    out = pd.concat([shown, acted], axis=1).fillna(0).reset_index()
    kinds = {"impressions": int, "responses": int, "clicks": int, "conversions": int}
    out = out.rename(columns={"variant": "arm"}).astype(kinds)
    return out, len(joined)


def credit(imps: pd.DataFrame, outcomes: pd.DataFrame, exp: ExperimentConfig) -> pd.DataFrame:
    """Interleaving: per user, the clicks on each arm's items (the team of the clicked position)."""
    a, b = (arm.name for arm in exp.arms)
    shown = imps[["recommendation_id", "user_id", "items", "teams"]].explode(["items", "teams"])
    shown = shown.assign(position=shown.groupby(level=0).cumcount()).rename(columns={"items": "item_id"})
    shown = shown.dropna(subset=["item_id"])
    clicks = outcomes[outcomes["event_type"].str.lower() == exp.outcome_event.lower()]
    by_pos = clicks[clicks["position"].notna()].astype({"position": "int64"})
    hits = [
        by_pos.merge(shown, on=["recommendation_id", "position"], suffixes=("_clicked", "")),
        clicks[clicks["position"].isna()].drop(columns="position").merge(shown, on=["recommendation_id", "item_id"]),
    ]
    hit = pd.concat(hits, ignore_index=True)
    users = pd.Index(imps["user_id"].unique(), name="user_id")
    counts = hit.groupby(["user_id", "teams"]).size().unstack(fill_value=0).reindex(index=users, fill_value=0)
    return pd.DataFrame({arm: counts[arm] if arm in counts else np.zeros(len(users), int) for arm in (a, b)})


def build(store: ObjectStore, cfg: TenantConfig, name: str, end: datetime) -> dict[str, Any]:
    """The report of experiment `name` over its impressions up to `end` (exclusive)."""
    exp = find(cfg, name)
    for problem in unknown_releases(store, cfg):
        log.error("tenant %s: %s", cfg.tenant, problem)
    start = None if exp.start is None else datetime.combine(exp.start, datetime.min.time(), tzinfo=end.tzinfo)
    imps = read_impressions(store, cfg.tenant, name, start, end)
    outcomes = read_outcomes(store, cfg.tenant, start, end)
    doc: dict[str, Any] = {
        "tenant": cfg.tenant,
        "experiment": name,
        "interval_end": end.isoformat(),
        "day": report_day(end),
        "window_start": None if start is None else start.isoformat(),
        "outcome_event": exp.outcome_event,
        "conversion_event": exp.conversion_event,
        "responses": len(imps),
    }
    if exp.interleave:
        doc["interleaving"] = analysis.interleaving(
            credit(imps, outcomes, exp), [a.name for a in exp.arms], confidence=exp.confidence,
            min_users=exp.min_users,
        )  # fmt: skip
        doc["arms"] = []
        doc["trustworthy"] = True
        return doc
    users, attributed = per_user(imps, outcomes, exp)
    shares = {a.name: a.share for a in exp.arms}
    doc |= analysis.analyse(
        users, list(shares), shares, exp.control_arm, confidence=exp.confidence, min_users=exp.min_users
    )
    doc["attributed_outcomes"] = attributed
    return doc


def report_key(tenant: str, experiment: str, day: str) -> str:
    return f"{paths.experiment_prefix(tenant, experiment)}/reports/{day}.json"


def report_day(end: datetime) -> str:
    """The day a report covers the end of: the data interval ending at 00:00 reports the day before."""
    return (end - timedelta(microseconds=1)).strftime("%Y-%m-%d")


def history(store: ObjectStore, tenant: str, experiment: str) -> list[dict[str, Any]]:
    """The experiment's stored daily reports, oldest first."""
    prefix = f"{paths.experiment_prefix(tenant, experiment)}/reports/"
    return [json.loads(store.get(k)) for k in sorted(store.list(prefix)) if k.endswith(".json")]


def latest(store: ObjectStore, tenant: str, experiment: str) -> dict[str, Any] | None:
    prefix = f"{paths.experiment_prefix(tenant, experiment)}/reports/"
    keys = sorted(k for k in store.list(prefix) if k.endswith(".json"))
    return json.loads(store.get(keys[-1])) if keys else None


def run(store: ObjectStore, cfg: TenantConfig, end: datetime, tracking_uri: str | None = None) -> dict[str, Any]:
    """Every experiment of the tenant: build, store, log to MLflow (the daily task and the CLI)."""
    out = {}
    for exp in cfg.live_experiments():
        doc = build(store, cfg, exp.name, end)
        day = report_day(end)
        store.put(report_key(cfg.tenant, exp.name, day), codecs.json_bytes(doc))
        if tracking_uri:
            doc["mlflow"] = log_to_mlflow(tracking_uri, doc, day)
        out[exp.name] = {k: doc.get(k) for k in ("responses", "trustworthy", "mlflow")} | {
            "verdicts": {a["arm"]: a.get("verdict") for a in doc.get("arms", []) if "verdict" in a}
        }
    return out


def log_to_mlflow(tracking_uri: str, doc: dict[str, Any], day: str) -> str:
    """One MLflow run per (experiment, day) in the tenant's experiment; per-arm metrics. Never raises."""
    from pipeline.ops import tracking

    try:
        mlf = tracking.client(tracking_uri)
        name = tracking.experiment_name(doc["tenant"])
        found = mlf.get_experiment_by_name(name)
        exp_id = found.experiment_id if found else mlf.create_experiment(name)
        tags = {"recsys.tenant": doc["tenant"], "recsys.experiment": doc["experiment"], "recsys.report_day": day}
        query = f"tags.`recsys.experiment` = '{doc['experiment']}' and tags.`recsys.report_day` = '{day}'"
        runs = mlf.search_runs([exp_id], filter_string=query, max_results=1)
        run_id = (
            runs[0].info.run_id
            if runs
            else mlf.create_run(exp_id, run_name=f"ab-{doc['experiment']}-{day}", tags=tags).info.run_id
        )
        metrics = {"responses": float(doc["responses"])}
        for a in doc.get("arms", []):
            for key in ("users", "responses", "impressions", "clicks", "ctr", "conversion", "ctr_lift"):
                if a.get(key) is not None:
                    metrics[f"{a['arm']}.{key}"] = float(a[key])
        if doc.get("srm", {}).get("p_value") is not None:
            metrics["srm_p_value"] = float(doc["srm"]["p_value"])
        if (pref := doc.get("interleaving", {}).get("preference")) is not None:
            metrics["interleaving_preference"] = float(pref)
        from mlflow.entities import Metric

        stamp = int(datetime.fromisoformat(doc["interval_end"]).timestamp() * 1000)
        mlf.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()])
        mlf.set_terminated(run_id)
        return f"run {run_id}"
    except Exception as exc:  # noqa: BLE001 - the report is stored; MLflow lagging is reported
        log.error("experiment %s/%s: MLflow logging failed: %s", doc["tenant"], doc["experiment"], exc)
        return f"failed: {exc}"

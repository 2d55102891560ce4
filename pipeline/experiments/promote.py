"""Promotion: make an experiment's winning arm live, recorded like a rollback.

The arm's release (the challenger, or a pinned release id) is loaded as serving loads it and
smoke-queried; the pointer moves in one conditional put from the release promote read (a
publish landing in between wins: nothing moves), carrying the record {kind: promote,
experiment, arm, reason, by, at, promoted_from}; Redis gets the release's keys and flips at
the new generation; the challenger record is cleared if it named this release; the MLflow
alias follows the pointer. `tenants/{t}/experiments/{name}/promotions.json` keeps every
promotion. Safety: the latest report must name the arm the winner and pass the SRM check,
unless `force` (a person's call, recorded). An arm that serves the live release with other
options has no release to promote: the message says to make its options the tenant's own.
A pinned tenant is refused (unpin first): a pin is a person's hold and promotion must not
lift it silently.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline.config import Settings, load_tenant
from pipeline.config.experiments import CHALLENGER, LIVE
from pipeline.experiments import report
from pipeline.experiments.challenger import clear_challenger, read_challenger
from pipeline.release import alias, verify
from pipeline.release import format as release
from pipeline.release.rollback import _finish_redis, _now, _who
from pipeline.storage import ObjectStore, PreconditionFailed, codecs, open_store, paths

log = logging.getLogger(__name__)


class PromotionError(RuntimeError):
    pass


def _target(store: ObjectStore, tenant: str, exp_name: str, arm_name: str, arm: Any) -> str:
    if arm.release == LIVE:
        opts = arm.options()
        raise PromotionError(
            f"tenant {tenant}: experiment {exp_name!r} arm {arm_name!r} serves the live release"
            + (f" with options {opts}: make them the tenant's serving options instead" if opts else ": nothing to move")
        )
    if arm.release == CHALLENGER:
        doc = read_challenger(store, tenant)
        if doc is None:
            raise PromotionError(f"tenant {tenant}: no challenger is published (tenants/{tenant}/challenger.json)")
        return str(doc["release_id"])
    return str(arm.release)


def _check_report(store: ObjectStore, tenant: str, exp_name: str, arm_name: str) -> dict[str, Any]:
    latest = report.latest(store, tenant, exp_name)
    if latest is None:
        raise PromotionError(f"tenant {tenant}: experiment {exp_name!r} has no report yet; --force to promote anyway")
    if not latest.get("trustworthy", True):
        raise PromotionError(
            f"tenant {tenant}: experiment {exp_name!r}'s report of {latest['interval_end']} failed the sample-ratio "
            f"check (p={latest['srm']['p_value']:.2g}): its numbers are not to be trusted; --force to promote anyway"
        )
    row = next((a for a in latest.get("arms", []) if a["arm"] == arm_name), None)
    winner = (latest.get("interleaving") or {}).get("winner")
    if (row is None or row.get("verdict") != "winner") and winner != arm_name:
        verdict = row.get("verdict") if row else winner and f"{winner} preferred"
        raise PromotionError(
            f"tenant {tenant}: arm {arm_name!r} of {exp_name!r} is not the winner in the report of "
            f"{latest['interval_end']} ({verdict}); --force to promote anyway"
        )
    return latest


def promote(
    settings: Settings,
    tenant: str,
    experiment: str,
    arm_name: str,
    *,
    reason: str = "",
    by: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    cfg = load_tenant(tenant, settings.tenants_dir)
    try:
        exp = report.find(cfg, experiment)
        arm = exp.arm(arm_name)
    except (report.ExperimentError, KeyError) as exc:
        raise PromotionError(str(exc).strip('"')) from None
    store = open_store(settings.artifact_root)
    target = _target(store, tenant, experiment, arm_name, arm)
    evidence = None if force else _check_report(store, tenant, experiment, arm_name)
    pointer = release.read_pointer(store, tenant)
    if pointer is None:
        raise PromotionError(f"tenant {tenant}: nothing published, nothing to promote over")
    current = pointer[0]["release_id"]
    if pointer[0].get("pinned"):
        raise PromotionError(
            f"tenant {tenant} is pinned at {current}; unpin it first: python -m pipeline unpin {tenant}"
        )
    if target == current:
        return {"tenant": tenant, "release_id": current, "moved": False, "reason": "already live"}
    try:
        servable = verify.load_servable(store, tenant, target)
        verify.smoke_query(servable)
    except FileNotFoundError as exc:
        raise PromotionError(f"tenant {tenant}: release {target} is incomplete: {exc}") from None
    rel = servable.release
    record = {
        "kind": "promote",
        "experiment": experiment,
        "arm": arm_name,
        "reason": reason or f"{arm_name} won {experiment}",
        "by": _who(by),
        "at": _now(),
        "promoted_from": current,
        "forced": force,
        "report_interval_end": evidence["interval_end"] if evidence else None,
    }
    flip = release.flip_pointer(
        store,
        tenant,
        release.Pointer(
            target,
            rel.manifest["data_interval_end"],
            extra={"model": rel.manifest.get("model"), "promotion": record},
        ),
        allow_backwards=True,
        expect_release=current,
    )
    if not flip.moved:
        raise PromotionError(f"tenant {tenant}: pointer not moved: {flip.reason}; nothing promoted")
    _append(store, tenant, experiment, {**record, "release_id": target, "generation": flip.generation})
    cleared = clear_challenger(store, tenant, target)
    redis_out = _finish_redis(settings, store, rel, flip.generation)
    log.warning(
        "promote tenant=%s: %s -> %s (%s/%s) by %s", tenant, current, target, experiment, arm_name, record["by"]
    )
    registry = alias.follow_pointer(settings.mlflow_tracking_uri, store, tenant, target)
    return {
        "tenant": tenant,
        "release_id": target,
        "previous_release_id": current,
        "moved": True,
        "challenger_cleared": cleared,
        "generation": flip.generation,
        **record,
        **redis_out,
        **registry,
    }


def _append(store: ObjectStore, tenant: str, experiment: str, record: dict[str, Any]) -> None:
    """Add to the experiment's promotion history by conditional put (never drops an entry)."""
    key = f"{paths.experiment_prefix(tenant, experiment)}/promotions.json"
    for _ in range(20):
        got = store.get_with_etag(key)
        doc = json.loads(got[0]) if got else {"promotions": []}
        doc["promotions"].append(record)
        try:
            store.put_if(key, codecs.json_bytes(doc), etag=got[1] if got else None)
            return
        except PreconditionFailed:
            continue
    raise PromotionError(f"tenant {tenant}: {key} kept changing; the pointer moved, the history entry is missing")

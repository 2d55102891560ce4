"""`python -m pipeline experiment report TENANT EXPERIMENT [--json]` and `... promote TENANT EXPERIMENT ARM`."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _ci(ci: list[float | None] | None) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "-"
    return f"[{100 * ci[0]:+.2f}%, {100 * ci[1]:+.2f}%]"


def text(doc: dict[str, Any]) -> str:
    """The report as a table a person reads in a terminal."""
    lines = [
        f"experiment {doc['experiment']} of tenant {doc['tenant']}, up to {doc['interval_end']} "
        f"({doc['responses']} responses; impressions = items shown; clicks = '{doc['outcome_event']}' events)"
    ]
    if "interleaving" in doc:
        il = doc["interleaving"]
        a, b = il["arms"]
        lines.append(
            f"interleaved {a} vs {b}: {il['users_with_clicks']} users clicked; wins {il['wins']}; preference for "
            f"{a} {il['preference'] if il['preference'] is not None else '-'} CI {il['preference_ci']}: {il['verdict']}"
        )
        return "\n".join(lines)
    head = f"{'arm':<14}{'users':>8}{'impr':>9}{'clicks':>8}{'ctr':>9}  {'ctr 95% CI':<22}{'conv':>8}  {'lift':>8}  "
    lines.append(head + f"{'lift CI':<22}verdict")
    for a in doc["arms"]:
        lo, hi = a["ctr_ci"]
        ci = "-" if lo is None else f"[{100 * lo:.2f}%, {100 * hi:.2f}%]"
        lift = "-" if a.get("ctr_lift") is None else f"{100 * a['ctr_lift']:+.2f}%"
        lines.append(
            f"{a['arm']:<14}{a['users']:>8}{a['impressions']:>9}{a['clicks']:>8}{_pct(a['ctr']):>9}  {ci:<22}"
            f"{_pct(a['conversion']):>8}  {lift:>8}  {_ci(a.get('ctr_lift_ci')):<22}{a.get('verdict', 'control')}"
        )
    srm = doc["srm"]
    p = "-" if srm["p_value"] is None else f"{srm['p_value']:.3g}"
    lines.append(
        f"sample ratio: p={p} "
        + ("MISMATCH: the split is broken, do not trust these numbers" if srm["mismatch"] else "(ok)")
    )
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.cli import _interval_end, _load_config
    from pipeline.config import TenantConfigError, get_settings
    from pipeline.experiments import report
    from pipeline.storage import codecs, open_store

    try:
        cfg = _load_config(args)
    except TenantConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    settings = get_settings()
    end = _interval_end(args.interval_end) if args.interval_end else datetime.now(UTC)  # a person's "now"
    store = open_store(settings.artifact_root)
    try:
        doc = report.build(store, cfg, args.experiment, end)
    except report.ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.save:
        store.put(report.report_key(cfg.tenant, args.experiment, report.report_day(end)), codecs.json_bytes(doc))
    print(json.dumps(doc, indent=2) if args.json else text(doc))
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline.config import TenantConfigError, get_settings, is_valid_tenant_id
    from pipeline.experiments.promote import PromotionError, promote
    from pipeline.release.format import ReleaseError

    if not is_valid_tenant_id(args.tenant):
        print(f"error: invalid tenant id {args.tenant!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        out = promote(
            get_settings(), args.tenant, args.experiment, args.arm, reason=args.reason, by=args.by, force=args.force
        )
    except TenantConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (PromotionError, ReleaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(out))
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("experiment", help="online experiments: report, promote")
    inner = p.add_subparsers(dest="experiment_command", required=True)
    r = inner.add_parser("report", help="per-arm users, impressions, clicks, CTR with 95%% CIs, lift, SRM, verdict")
    r.add_argument("tenant", nargs="?", help="tenant id (include/tenants/TENANT.yaml)")
    r.add_argument("experiment")
    r.add_argument("--tenant-file", help="a tenant YAML file instead of a tenant id")
    r.add_argument("--interval-end", help="report up to this instant, ISO 8601 (default: now)")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--save", action="store_true", help="also store it as that day's report (as the daily task does)")
    r.set_defaults(fn=cmd_report)
    m = inner.add_parser("promote", help="make the winning arm's release live (recorded like a rollback)")
    m.add_argument("tenant")
    m.add_argument("experiment")
    m.add_argument("arm")
    m.add_argument("--reason", default="", help="why (recorded in the pointer and the promotion history)")
    m.add_argument("--by", help="who (recorded; default cli:<user name>)")
    m.add_argument("--force", action="store_true", help="promote without a winning, SRM-clean report")
    m.set_defaults(fn=cmd_promote)

"""`python -m pipeline run | summary | check-tenant | serve | rollback | pin | unpin | forget-user | experiment |
demo-data`.

Exit codes: 0 published (or nothing to do), 1 a stage failed, 2 bad usage or tenant config,
3 the gate rejected the model (the run is "skipped", not failed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3


def _interval_end(value: str | None) -> datetime:
    if value is None:
        # the trigger (not a stage) decides the interval: today 00:00 UTC, like a nightly run
        now = datetime.now(UTC)
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    dt = datetime.fromisoformat(value)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def _load_config(args: argparse.Namespace):
    from pipeline.config import get_settings, load_tenant, load_tenant_file

    if args.tenant_file:
        return load_tenant_file(args.tenant_file)
    if not args.tenant:
        raise SystemExit("give a TENANT or --tenant-file FILE")
    return load_tenant(args.tenant, get_settings().tenants_dir)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import TenantConfigError
    from pipeline.context import RunContext
    from pipeline.ops.summary import print_summary
    from pipeline.stages import GateRejected, run_all
    from pipeline.storage.lease import Holder, LeaseHeld

    try:
        cfg = _load_config(args)
    except TenantConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    start = _interval_end(args.interval_start) if args.interval_start else None
    ctx = RunContext(
        config=cfg,
        interval_end=_interval_end(args.interval_end),
        interval_start=start,
        holder=Holder.cli(),
        takeover=args.takeover,
    )
    try:
        run_all(ctx)
    except LeaseHeld as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except GateRejected as exc:
        print_summary(ctx)
        print(f"gate rejected the model: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except Exception as exc:
        logging.getLogger("pipeline").debug("run failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print_summary(ctx)
    return EXIT_OK


def _latest_run_end(cfg) -> datetime | None:
    from pipeline.config import get_settings
    from pipeline.storage import open_store, paths

    runs = paths.run_ids(open_store(get_settings().artifact_root).list(paths.runs_prefix(cfg.tenant)), cfg.tenant)
    return paths.interval_end_of(runs[-1]) if runs else None


def cmd_summary(args: argparse.Namespace) -> int:
    from pipeline.context import RunContext
    from pipeline.ops.summary import print_summary

    cfg = _load_config(args)
    end = _interval_end(args.interval_end) if args.interval_end else _latest_run_end(cfg)
    if end is None:
        print(f"error: tenant {cfg.tenant} has no runs yet", file=sys.stderr)
        return EXIT_FAILED
    ctx = RunContext(config=cfg, interval_end=end)
    return EXIT_OK if print_summary(ctx, curl_examples=args.curl) else EXIT_FAILED


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pipeline.serving.app import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, workers=1, log_level="info")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from pipeline.config import get_settings, is_valid_tenant_id
    from pipeline.release.format import ReleaseError
    from pipeline.release.rollback import RollbackError, pin, rollback, unpin

    if not is_valid_tenant_id(args.tenant):
        print(f"error: invalid tenant id {args.tenant!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "pin":
            result = pin(get_settings(), args.tenant, reason=args.reason, by=args.by)
        elif args.command == "unpin":
            result = unpin(get_settings(), args.tenant, by=args.by)
        else:
            result = rollback(get_settings(), args.tenant, args.to, reason=args.reason, by=args.by)
    except (RollbackError, ReleaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result))
    if result.get("registry") == "failed":
        # the pointer (what serving follows) did move: exit 0, but say loudly that MLflow lags
        print(
            f"warning: release {result['release_id']} is live, but the MLflow alias "
            f"'champion' was not moved ({result.get('registry_error')}); once MLflow is reachable run: "
            f"python -m pipeline rollback {args.tenant} --to {result['release_id']}",
            file=sys.stderr,
        )
    if result.get("pinned") and args.command == "rollback":
        print(
            f"note: tenant {args.tenant} is pinned at {result['release_id']} and {result['blocklisted']} is "
            f"blocklisted; publishes will not move the pointer until: python -m pipeline unpin {args.tenant}",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_check_tenant(args: argparse.Namespace) -> int:
    from pipeline.config import get_settings
    from pipeline.ops.onboarding import check_tenant

    report = check_tenant(args.file, _interval_end(args.interval_end), get_settings())
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    if report.ok:
        return EXIT_OK
    return EXIT_USAGE if report.steps[-1].name == "config" else EXIT_FAILED


def cmd_forget_user(args: argparse.Namespace) -> int:
    import getpass

    from pipeline.config import get_settings
    from pipeline.ops.erasure import ErasureError, forget_user

    try:
        record = forget_user(
            get_settings(),
            args.tenant,
            args.user_id,
            requested_at=datetime.now(UTC),  # the operator's clock: this is a command, not a stage
            requested_by=args.requested_by or getpass.getuser(),
            reason=args.reason,
            request_id=args.request_id,
        )
    except ErasureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(record))
    return EXIT_OK


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pipeline.config import get_settings
    from pipeline.samples import demo

    settings = get_settings()
    out = Path(args.out) if args.out else settings.data_root / "data" / "demo"
    counts = demo.prepare(out, settings.home / "cache")
    print(json.dumps({"out": str(out), **counts}))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("run", cmd_run, "run every stage for a tenant, in process"),
        ("summary", cmd_summary, "print a run's summary"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("tenant", nargs="?", help="tenant id (include/tenants/TENANT.yaml)")
        p.add_argument("--tenant-file", help="a tenant YAML file instead of a tenant id")
        p.add_argument(
            "--interval-end",
            help="data interval end, ISO 8601 (run: default today 00:00 UTC; summary: default the latest run)",
        )
        if name == "run":
            p.add_argument(
                "--interval-start",
                help="data interval start, ISO 8601 (default: the schedule's previous tick before the end)",
            )
            p.add_argument(
                "--takeover",
                action="store_true",
                help="take the interval's lease from another copy of this run (it must be dead or unwanted: "
                "its later writes fail)",
            )
        if name == "summary":
            p.add_argument("--curl", action="store_true", help="also print curl examples against the API")
        p.set_defaults(fn=fn)
    p = sub.add_parser(
        "check-tenant",
        help="try a new tenant file before committing it: config, source, validation (writes nothing)",
    )
    p.add_argument("file", help="the tenant YAML, e.g. include/tenants/acme.yaml")
    p.add_argument("--interval-end", help="check the first run of this interval end (default: today 00:00 UTC)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=cmd_check_tenant)
    p = sub.add_parser("serve", help="start the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(fn=cmd_serve)
    for name, help_ in (
        (
            "rollback",
            "make the previous (or a named) release live again, pin the tenant there, blocklist the release "
            "rolled back from, and move the MLflow alias 'champion'",
        ),
        ("pin", "hold the tenant at its live release: publishes move nothing until unpin"),
        ("unpin", "lift a pin (or a rollback's pin): the next newer release moves the pointer again"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("tenant")
        if name == "rollback":
            p.add_argument("--to", help="release id (default: the live release's previous one)")
        if name != "unpin":
            p.add_argument("--reason", default="", help="why (recorded in the pointer and pin.json)")
        p.add_argument("--by", help="who (recorded; default cli:<user name>)")
        p.set_defaults(fn=cmd_rollback)
    p = sub.add_parser(
        "forget-user",
        help="delete a user's data on request: history, event log, Redis keys, every later release; "
        "writes an audit record",
    )
    p.add_argument("tenant")
    p.add_argument("user_id")
    p.add_argument("--reason", default="", help="why (e.g. the ticket of the request); goes into the audit record")
    p.add_argument("--requested-by", help="who asked for it (default: the OS user running the command)")
    p.add_argument("--request-id", help="the request's id in the audit record (default: a new UUID)")
    p.set_defaults(fn=cmd_forget_user)
    from pipeline.experiments.cli import add_parser as add_experiment_parser

    add_experiment_parser(sub)
    p = sub.add_parser("demo-data", help="prepare the MovieLens-100K demo tenant's data")
    p.add_argument("--out", help="output folder (default: data/demo under RECSYS_DATA_ROOT)")
    p.set_defaults(fn=cmd_demo_data)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("alembic", "mlflow", "great_expectations", "urllib3", "botocore", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(f"error: {exc.code}", file=sys.stderr)
            return EXIT_USAGE
        raise

"""`python -m pipeline run | summary | serve | rollback | demo-data`.

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
    from pipeline.release.rollback import RollbackError, rollback

    if not is_valid_tenant_id(args.tenant):
        print(f"error: invalid tenant id {args.tenant!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = rollback(get_settings(), args.tenant, args.to)
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
    p = sub.add_parser("serve", help="start the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser(
        "rollback",
        help="make the previous (or a named) release live again, and move the MLflow alias 'champion' to it",
    )
    p.add_argument("tenant")
    p.add_argument("--to", help="release id (default: the live release's previous one)")
    p.set_defaults(fn=cmd_rollback)
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

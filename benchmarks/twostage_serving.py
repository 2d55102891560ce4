"""What the second stage costs a request: ML-100K's demo tenant with `two_stage` on, through the
whole chain to a published release, then the recommendations code path in-process.

    PYTHONPATH=. .venv/bin/python benchmarks/twostage_serving.py [--requests 3000]
        [--out benchmarks/results/twostage_serving.json]

Each request is `answers.recommend_many` for one known user, k=10, no filters (the route's
work after the user read: retrieval from the precomputed candidates, then the second stage
or not), on the same loaded release with and without its ranker, interleaved so both see the
same machine load. No HTTP, no Redis: this is the second stage's added CPU per request, not
the HTTP serving benchmark (benchmarks/serving). Also records the run's own evaluation
(two_stage beside the model on the holdout) and the gate's two-stage decision; when the gate
did not choose two stages, the release is built anyway with `forced: true` recorded, so the
cost can be measured.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.quality import _cpu  # noqa: E402
from pipeline.config import Settings, TenantConfig, load_tenant_file  # noqa: E402
from pipeline.context import RunContext  # noqa: E402
from pipeline.release import verify  # noqa: E402
from pipeline.samples import demo  # noqa: E402
from pipeline.serving import answers  # noqa: E402
from pipeline.serving.live import LiveRelease  # noqa: E402
from pipeline.serving.schemas import Options  # noqa: E402
from pipeline.serving.user_store import EmbeddedStore  # noqa: E402
from pipeline.stages import GateRejected, run_all, run_stage  # noqa: E402
from pipeline.storage import codecs, paths  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _chain(ctx: RunContext) -> tuple[str, dict, bool]:
    """Run to publish; (release id, gate's two-stage record, whether serving it was forced)."""
    try:
        run_all(ctx, until="gate")
    except GateRejected:
        pass  # the single stage lost to popularity etc.: not expected on ML-100K; publish anyway below
    decision = codecs.read_json(ctx.store.get(ctx.key(paths.DECISION)))
    judged = dict(decision.get("two_stage") or {})
    forced = not judged.get("serve") or not decision.get("publish")
    if forced:
        decision["two_stage"] = {**judged, "serve": True}
        decision["publish"] = True
        ctx.store.put(ctx.key(paths.DECISION), codecs.json_bytes(decision))
    for stage in ("refit", "index", "publish"):
        out = run_stage(stage, ctx)
    return out["release_id"], judged, forced


@dataclasses.dataclass(frozen=True)
class Built:
    """The demo tenant's two-stage release, published under `ctx.settings.artifact_root`."""

    ctx: RunContext
    release_id: str
    judged: dict  # the gate's two-stage record, as it decided
    forced: bool  # True: the gate declined two stages (or publishing) and the release was built anyway
    chain_seconds: float
    evaluation: dict  # the run's evaluate output (metrics.json)


def build(home: Path) -> Built:
    """ML-100K's demo tenant with `two_stage: {enabled: true}` through the chain to a published
    release, all state under `home`; also used by the HTTP benchmark (`benchmarks.serving --two-stage`)."""
    settings = Settings(home=home, data_root=ROOT, mlflow_tracking_uri=f"sqlite:///{home}/m.db")
    demo.prepare(ROOT / "data" / "demo", ROOT / "var" / "cache")
    base = load_tenant_file(ROOT / "include" / "tenants" / "demo.yaml")
    cfg = TenantConfig.model_validate({**base.model_dump(), "two_stage": {"enabled": True}})
    ctx = RunContext(config=cfg, interval_end=datetime(2026, 1, 1, tzinfo=UTC), settings=settings)
    started = time.perf_counter()
    release_id, judged, forced = _chain(ctx)
    chain_seconds = time.perf_counter() - started
    evaluation = codecs.read_json(ctx.store.get(ctx.key(paths.METRICS)))
    return Built(ctx, release_id, judged, forced, chain_seconds, evaluation)


def _time(live: LiveRelease, user_id: str, metrics: answers.Metrics) -> float:
    t = time.perf_counter()
    answers.recommend_many(live, "demo", [user_id], Options(k=10), metrics)
    return (time.perf_counter() - t) * 1000


def _summary(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {q: round(float(np.percentile(a, p)), 3) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))} | {
        "mean": round(float(a.mean()), 3)
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "twostage_serving.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        built = build(Path(tmp))
        ctx, release_id, judged, forced = built.ctx, built.release_id, built.judged, built.forced
        chain_seconds, evaluation = built.chain_seconds, built.evaluation
        servable = verify.load_servable(ctx.store, "demo", release_id)
    two = LiveRelease(servable.release, servable.index, EmbeddedStore())
    one = LiveRelease(dataclasses.replace(servable.release, two_stage=None), servable.index, EmbeddedStore())
    assert two.release.two_stage is not None
    metrics = answers.Metrics()
    users = list(two.release.user_ids)
    for u in users[:50]:  # warm caches and lazy properties of both
        _time(two, u, metrics), _time(one, u, metrics)
    times: dict[str, list[float]] = {"two_stage": [], "single_stage": []}
    for n in range(args.requests):  # interleaved: both variants see the same load
        u = users[n % len(users)]
        times["two_stage"].append(_time(two, u, metrics))
        times["single_stage"].append(_time(one, u, metrics))
    result = {
        "what": "answers.recommend_many for one known user, k=10, no filters, in-process (no HTTP, no Redis)",
        "dataset": "MovieLens-100K (recbole 1.2.1 wheel), demo tenant + two_stage: {enabled: true}",
        "requests": args.requests,
        "ms_per_request": {name: _summary(ms) for name, ms in times.items()},
        "evaluation": evaluation["metrics"],
        "gate_two_stage": judged,
        "forced": forced,
        "chain_seconds": round(chain_seconds, 1),
        "machine": {"cpu_model": _cpu()["cpu_model"], "cpus": os.cpu_count(), "threads": 1, "load": os.getloadavg()},
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

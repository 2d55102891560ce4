"""Which policy serves a user: the default (the live release, the request's options) or an
experiment arm's (another release and/or other serving options), chosen by the stateless hash
of `pipeline/experiments/assign.py`.

Per tenant the experiments come from its YAML (`include/tenants/{t}.yaml`, re-read every poll
period in a background thread, the first read inline: one small file); an invalid file is
logged and the last valid experiments stay. The releases arms serve besides the live one (the
challenger of `tenants/{t}/challenger.json`, pinned release ids) are loaded and verified in
that thread too, as serving loads any release, with their own files as the user store (only
the live release's users are in Redis). A request never waits for them: while an arm's
release is not loaded, its users get the default policy with `variant: null`, counted in
`recsys_experiment_unserved_total` (the SRM check of the report shows the hole too).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter

from pipeline.config import Settings, TenantConfig, TenantConfigError, load_tenant
from pipeline.config.experiments import CHALLENGER, LIVE, ArmConfig, ExperimentConfig
from pipeline.experiments.assign import assign
from pipeline.experiments.challenger import read_challenger
from pipeline.experiments.report import unknown_releases
from pipeline.release import verify
from pipeline.serving.live import LiveRelease
from pipeline.serving.schemas import Options
from pipeline.serving.user_store import EmbeddedStore
from pipeline.storage import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """One arm as served: the release and the options its users get."""

    arm: str
    live: LiveRelease
    opts: Options


@dataclass(frozen=True)
class Policy:
    """What a user gets. `arms`: one (A/B arm or default), or two (interleaved)."""

    arms: tuple[Served, ...]
    experiment: str | None = None
    variant: str | None = None

    @property
    def live(self) -> LiveRelease:
        return self.arms[0].live

    @property
    def opts(self) -> Options:
        return self.arms[0].opts

    @property
    def interleaved(self) -> bool:
        return len(self.arms) == 2


INTERLEAVED = "interleaved"


class Variants:
    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.store, self.clock = settings, store, clock
        self.poll_seconds = max(settings.release_poll_seconds, 1.0)
        self._experiments: dict[str, list[ExperimentConfig]] = {}
        self._config: dict[str, TenantConfig] = {}
        self._challenger: dict[str, str | None] = {}
        self._arms: dict[tuple[str, str], LiveRelease] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._checked: dict[str, float] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="experiments")
        self.unserved = Counter(
            "recsys_experiment_unserved_total",
            "Users of an experiment arm served the default policy: the arm's release is not loaded",
            ["tenant", "experiment", "arm"],
            registry=registry or CollectorRegistry(),
        )

    def experiments(self, tenant: str) -> list[ExperimentConfig]:
        """The tenant's experiments (no I/O after its first call; refreshed in the background)."""
        if tenant not in self._experiments:
            self._read_config(tenant)
            self._schedule(tenant)
        elif self.clock() - self._checked.get(tenant, 0.0) >= self.poll_seconds:
            self._schedule(tenant)
        return self._experiments[tenant]

    def _schedule(self, tenant: str) -> None:
        with self._lock:
            if tenant in self._pending:
                return
            self._pending.add(tenant)
            self._checked[tenant] = self.clock()
        try:
            self._pool.submit(self._background, tenant)
        except RuntimeError:  # shut down
            self._pending.discard(tenant)

    def _background(self, tenant: str) -> None:
        try:
            self.refresh(tenant)
        except Exception:  # noqa: BLE001 - the next poll tries again; serving goes on
            log.exception("tenant %s: experiments refresh failed", tenant)
        finally:
            with self._lock:
                self._pending.discard(tenant)

    def _read_config(self, tenant: str) -> None:
        try:
            cfg = load_tenant(tenant, self.settings.tenants_dir)
        except TenantConfigError as exc:
            if "file not found" not in str(exc):
                log.error("tenant %s: experiments not updated: %s", tenant, exc)
            self._experiments.setdefault(tenant, [])
            return
        self._experiments[tenant] = cfg.live_experiments()
        self._config[tenant] = cfg

    def refresh(self, tenant: str) -> None:
        """Re-read the config and the challenger record; load the arms' releases (blocking: tests call it)."""
        self._read_config(tenant)
        needs = [a for e in self._experiments[tenant] for a in e.arms if a.release != LIVE]
        if any(a.release == CHALLENGER for a in needs):
            doc = read_challenger(self.store, tenant)
            self._challenger[tenant] = doc["release_id"] if doc else None
        wanted = {rid for a in needs if (rid := self._release_of(tenant, a)) is not None}
        for rid in sorted(wanted - {rid for t, rid in self._arms if t == tenant}):
            failed = self._failed.get((tenant, rid))
            if failed is not None and self.clock() - failed < self.settings.release_retry_seconds:
                continue
            try:
                servable = verify.load_servable(self.store, tenant, rid)
            except Exception as exc:  # noqa: BLE001 - unknown or broken release: its arm is not served
                self._failed[(tenant, rid)] = self.clock()
                why = unknown_releases(self.store, self._config[tenant]) if tenant in self._config else []
                path = self.settings.tenants_dir / f"{tenant}.yaml"
                log.error(
                    "tenant %s: experiment release %s cannot be loaded (%s); its arm is not served%s",
                    tenant, rid, exc, "".join(f"\n  {path}: {w}" for w in why),
                )  # fmt: skip
                continue
            self._arms[(tenant, rid)] = LiveRelease(
                servable.release, servable.index, EmbeddedStore(self.settings.fold_in_cache_users)
            )
            log.info("tenant %s: experiment release %s loaded", tenant, rid)
        for key in [k for k in self._arms if k[0] == tenant and k[1] not in wanted]:
            del self._arms[key]  # the arm or the challenger went away

    def _release_of(self, tenant: str, arm: ArmConfig) -> str | None:
        if arm.release == CHALLENGER:
            return self._challenger.get(tenant)
        return arm.pinned_release

    def _served(self, tenant: str, live: LiveRelease, arm: ArmConfig, opts: Options) -> Served | None:
        rid = live.release_id if arm.release == LIVE else self._release_of(tenant, arm)
        if rid is None:
            return None
        target = live if rid == live.release_id else self._arms.get((tenant, rid))
        if target is None:
            return None
        return Served(arm.name, target, opts.model_copy(update=arm.options()) if arm.options() else opts)

    def policy(self, tenant: str, live: LiveRelease, user_id: str, opts: Options) -> Policy:
        """The user's policy for this request (no I/O)."""
        default = Policy((Served("", live, opts),))
        experiments = self.experiments(tenant)
        if not experiments:
            return default
        got = assign(tenant, experiments, user_id)
        if got is None:
            return default
        exp = got.experiment
        arms = exp.arms if exp.interleave else [got.arm]
        served = [self._served(tenant, live, a, opts) for a in arms]
        if any(s is None for s in served):
            self.unserved.labels(tenant, exp.name, INTERLEAVED if exp.interleave else got.arm.name).inc()
            return default
        variant = INTERLEAVED if exp.interleave else got.arm.name
        return Policy(tuple(s for s in served if s is not None), exp.name, variant)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

"""`check-tenant`: try a new tenant file before it is committed, without touching any real store.

A tenant file that parses can still fail its first night: a source path that does not exist,
a column map naming the wrong column, an event type nobody listed, data the validation suite
refuses. This runs the file through the same code a first run uses, up to validation, in a
throwaway artifact root: the config (every field, the file name), the expectations files, the
source (reachable, columns mapped, timestamps parsed), the catalog and user attribute sources,
and the validation suite over what was read. Nothing is written outside a temporary folder,
so it is safe against a production deployment's settings.

What it reads is what the tenant's first run would read for `interval_end` (its bootstrap:
every event before it), so the validation verdict is the first run's verdict.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.config import Settings, TenantConfigError, load_tenant_file
from pipeline.storage import paths

STEPS = ("config", "source", "validation")


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class TenantCheck:
    tenant_file: str
    tenant: str | None
    steps: list[Step]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps) and len(self.steps) == len(STEPS)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant_file": self.tenant_file,
            "tenant": self.tenant,
            "ok": self.ok,
            "steps": [s.__dict__ for s in self.steps],
            "warnings": self.warnings,
        }

    def text(self) -> str:
        lines = [f"check-tenant {self.tenant_file}" + (f" (tenant {self.tenant})" if self.tenant else "")]
        for s in self.steps:
            lines.append(f"  [{'ok' if s.ok else 'FAIL'}] {s.name}: {s.detail}")
        lines += [f"  (warning) {w}" for w in self.warnings]
        skipped = STEPS[len(self.steps) :]
        if skipped:
            lines.append(f"  not reached: {', '.join(skipped)}")
        lines.append("ready to commit" if self.ok else "NOT ready: fix the first failure above and run it again")
        return "\n".join(lines)


def _settings_for(base: Settings, tenant_file: Path, root: str) -> Settings:
    """The deployment's settings, with a throwaway artifact root; the suite files the tenant will use."""
    in_tenants_dir = tenant_file.resolve().parent == base.tenants_dir.resolve()
    expectations = base.expectations_dir if in_tenants_dir else tenant_file.resolve().parent.parent / "expectations"
    if expectations is None or not expectations.is_dir():
        expectations = base.expectations_dir
    return base.model_copy(
        update={
            "artifact_root": root,
            "redis_url": None,
            "tenants_dir": tenant_file.parent,
            "expectations_dir": expectations,
        }
    )


def check_tenant(tenant_file: str | Path, interval_end: datetime, settings: Settings) -> TenantCheck:
    """Every step up to the first failure; never raises for a problem of the tenant's."""
    from pipeline.context import RunContext
    from pipeline.stages import run_stage

    path = Path(tenant_file)
    out = TenantCheck(str(path), None, [], [])
    try:
        cfg = load_tenant_file(path, expect_name_match=True)
    except TenantConfigError as exc:
        out.steps.append(Step("config", False, str(exc)))
        return out
    out.tenant = cfg.tenant
    kinds = ", ".join(cfg.model_kinds())
    out.steps.append(Step("config", True, f"valid; models {kinds}; schedule {cfg.schedule}", {"models": kinds}))
    if (settings.tenants_dir / path.name).exists() and path.resolve() != (settings.tenants_dir / path.name).resolve():
        out.warnings.append(
            f"a tenant {cfg.tenant!r} already exists in {settings.tenants_dir}: this file would replace it"
        )

    with tempfile.TemporaryDirectory(prefix=f"check-{cfg.tenant}-") as root:
        ctx = RunContext(config=cfg, interval_end=interval_end, settings=_settings_for(settings, path, root))
        try:
            extracted = run_stage("extract", ctx)
        except Exception as exc:  # noqa: BLE001 - reported as the step's failure, with the stage's message
            out.steps.append(Step("source", False, f"{type(exc).__name__}: {exc}"))
            return out
        facts = {
            k: extracted.get(k)
            for k in ("source_kind", "files", "rows", "users", "items", "min_timestamp", "max_timestamp")
        }
        facts |= {k: extracted[k] for k in ("catalog_items", "user_attributes") if extracted.get(k) is not None}
        if not extracted.get("rows"):
            out.steps.append(Step("source", False, f"no events before {interval_end.isoformat()}", facts))
            return out
        out.steps.append(
            Step(
                "source",
                True,
                f"{facts['rows']} events of {facts['users']} users and {facts['items']} items "
                f"({facts['min_timestamp']} .. {facts['max_timestamp']}), "
                + (
                    f"{facts['files']} source file(s)" if facts["source_kind"] == "files" else f"{facts['source_kind']}"
                ),
                facts,
            )
        )
        for k in (
            "dropped_unknown_event_types",
            "dropped_zero_weight",
            "dropped_below_rating_threshold",
            "unparseable_timestamps",
            "dropped_after_interval_end",
        ):
            if extracted.get(k):
                out.warnings.append(f"extract: {k} = {extracted[k]}")
        try:
            validated = run_stage("validate", ctx)
        except Exception as exc:  # noqa: BLE001 - ValidationFailed names every blocking check
            out.steps.append(Step("validation", False, str(exc).split("\nreport:", 1)[0]))
            return out
        out.steps.append(
            Step(
                "validation",
                True,
                f"{validated['evaluated']} expectations evaluated, none blocking, {validated['warnings']} warning(s), "
                f"{validated['excluded_users']} user(s) filtered as bots",
                {k: validated[k] for k in ("evaluated", "warnings", "excluded_users", "duplicate_rows")},
            )
        )
        if validated["warnings"]:
            report = ctx.read_json(paths.VALIDATION_REPORT)
            out.warnings += [f"validation: {w}" for w in report.get("warnings", [])]
    return out

"""The validation suite's configuration: built-in defaults, then YAML layers, checked by pydantic.

Layers, each overriding the one before (dicts merge key by key; `expectations` lists add up):

1. the defaults below (the "default suite"), applied to every tenant;
2. `{expectations_dir}/_default.yaml`, when present: a deployment-wide layer;
3. the tenant file's `validation:` shorthands (`min_rows`, `min_timestamp`,
   `max_duplicate_fraction`, `rating_range`), only where the tenant set them;
4. `{expectations_dir}/{tenant}.yaml`, when present: what this tenant adds or relaxes.

Every check has `severity: blocking` (the run stops) or `warning` (reported, the run goes on)
and `enabled: false` to turn it off. `expectations:` adds any GX 1.x expectation by type and
kwargs. An invalid layer raises `ExpectationsFileError` naming the file, the field and the reason.
GX itself is not imported here (checked against GX when the suite is built).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.config.models import _Strict
from pipeline.config.tenant import TenantConfig, TenantConfigError

Severity = Literal["blocking", "warning"]
DEFAULT_FILE = "_default.yaml"


class ExpectationsFileError(TenantConfigError):
    """An invalid expectations file; the message names the file, the field(s) and the reason(s)."""


class Check(_Strict):
    severity: Severity = "blocking"
    enabled: bool = True


class RowCount(Check):
    min: int = Field(default=100, ge=1, description="Rows the extract must hand over (all rows, not the interval).")


class Range(Check):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


class OldTimestamps(Check):
    min: datetime = Field(default=datetime(1990, 1, 1, tzinfo=UTC), description="Earlier is implausible.")

    @field_validator("min", mode="before")
    @classmethod
    def _utc(cls, value: Any) -> Any:
        if isinstance(value, date | str) and not isinstance(value, datetime):
            try:
                value = datetime.fromisoformat(str(value))
            except ValueError:
                return value  # pydantic reports it
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value


class FutureTimestamps(Check):
    max_skew_hours: float = Field(default=1.0, ge=0, description="Allowed beyond the data interval's end.")


STANDARD_EVENT_TYPES = ["view", "click", "add_to_cart", "purchase", "rating", "interaction"]


class EventTypes(Check):
    allowed: list[str] | None = Field(
        default=None,
        min_length=1,
        description="None: 'interaction' + the tenant's source.event_types when set, else STANDARD_EVENT_TYPES.",
    )

    def allowed_for(self, cfg: TenantConfig) -> list[str]:
        if self.allowed is not None:
            return sorted({t.strip().lower() for t in self.allowed})
        weights = cfg.source.event_types
        return sorted({"interaction", *weights}) if weights else list(STANDARD_EVENT_TYPES)


class Duplicates(Check):
    max_fraction: float = Field(
        default=0.01, ge=0, le=1, description="Interval events repeating an earlier (user, item, timestamp)."
    )


class Volume(Check):
    max_drop: float = Field(default=0.5, gt=0, le=1, description="Allowed drop below the trailing median.")
    window: int = Field(default=7, ge=1, description="Previous runs (within as many intervals) in the median.")
    min_history: int = Field(default=3, ge=1, description="Fewer previous runs: the check is skipped.")


class BotUsers(Check):
    max_events_per_hour: int = Field(default=1000, ge=1, description="Per user, per clock hour, in the interval.")
    filter: bool = Field(
        default=False,
        description="List flagged users in validate/excluded_users.parquet: the features stage drops their "
        "events; the check then reports as a warning.",
    )


class UnknownItems(Check):
    max_fraction: float = Field(default=0.01, ge=0, le=1, description="Interval events on items not in the catalog.")


class ExtraExpectation(_Strict):
    """Any GX 1.x expectation, e.g. {type: expect_column_values_to_match_regex, kwargs: {...}}."""

    type: str = Field(pattern=r"^expect_[a-z0-9_]+$")
    kwargs: dict[str, Any] = {}
    severity: Severity = "blocking"
    description: str | None = None


class SuiteConfig(_Strict):
    """Every check of the suite, with its default severity and thresholds."""

    schema_: Check = Field(default=Check(), alias="schema", description="Required columns exist, with their types.")
    not_null: Check = Check()
    blank_ids: Check = Check()
    row_count: RowCount = RowCount()
    rating_range: Range = Range()
    weight_range: Range = Range(min=0)
    old_timestamps: OldTimestamps = OldTimestamps()
    future_timestamps: FutureTimestamps = FutureTimestamps()
    event_types: EventTypes = EventTypes()
    duplicates: Duplicates = Duplicates()
    empty_interval: Check = Check(severity="warning")
    volume: Volume = Volume()
    bot_users: BotUsers = BotUsers(severity="warning")
    unknown_items: UnknownItems = UnknownItems(severity="warning")
    expectations: list[ExtraExpectation] = []

    model_config = {**_Strict.model_config, "populate_by_name": True}


def _merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in layer.items():
        if key == "expectations" and isinstance(value, list):
            out[key] = [*base.get(key, []), *value]
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value)
        else:
            out[key] = value
    return out


def _apply(suite: SuiteConfig, layer: dict[str, Any], source: str) -> SuiteConfig:
    try:
        return SuiteConfig.model_validate(_merge(suite.model_dump(by_alias=True), layer))
    except ValidationError as exc:
        lines = [f"invalid expectations in {source}:"]
        for e in exc.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(file)"
            lines.append(f"  field {field!r}: {e['msg']}")
        raise ExpectationsFileError("\n".join(lines)) from None


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ExpectationsFileError(f"invalid expectations file {path}: not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ExpectationsFileError(
            f"invalid expectations file {path}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    return raw


def _shorthands(cfg: TenantConfig) -> dict[str, Any]:
    """The tenant file's `validation:` fields that the tenant set explicitly."""
    v = cfg.validation
    given = v.model_fields_set
    out: dict[str, Any] = {}
    if "min_rows" in given:
        out["row_count"] = {"min": v.min_rows}
    if "min_timestamp" in given:
        out["old_timestamps"] = {"min": v.min_timestamp}
    if "max_duplicate_fraction" in given:
        out["duplicates"] = {"max_fraction": v.max_duplicate_fraction}
    if "rating_range" in given and v.rating_range is not None:
        out["rating_range"] = {"min": v.rating_range[0], "max": v.rating_range[1]}
    return out


def load_suite_config(cfg: TenantConfig, expectations_dir: str | Path) -> tuple[SuiteConfig, list[str], list[str]]:
    """The tenant's effective suite, the files it came from (in the order applied), and for
    each of its `expectations` the file that added it."""
    folder = Path(expectations_dir)
    suite = SuiteConfig()
    used: list[str] = []
    origins: list[str] = []
    layers: list[tuple[str, dict[str, Any]]] = []
    default = folder / DEFAULT_FILE
    if default.is_file():
        layers.append((str(default), _read(default)))
    if shorthands := _shorthands(cfg):
        layers.append((f"tenant config {cfg.tenant!r} (validation:)", shorthands))
    own = folder / f"{cfg.tenant}.yaml"
    if own.is_file():
        layers.append((str(own), _read(own)))
    for source, layer in layers:
        suite = _apply(suite, layer, source)
        if source.endswith(".yaml"):
            used.append(source)
        origins += [source] * (len(suite.expectations) - len(origins))
    return suite, used, origins

"""Request and response models of the HTTP API (they are the OpenAPI contract)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


def _utf8(value: str) -> str:
    value.encode("utf-8")  # lone surrogates cannot be stored: refuse them here, not in the log writer
    return value


def _iso_only(value: object) -> object:
    if isinstance(value, (int, float)):  # documented as an ISO 8601 string; epoch numbers are ambiguous
        raise ValueError("timestamp must be an ISO 8601 string")
    return value


ItemId = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_utf8)]
UserId = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_utf8)]
EventId = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_utf8)]
Names = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=100)]


class Options(BaseModel):
    """What to recommend: how many, which items may appear, and how to order them."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(default=10, ge=1, le=100, description="Number of items, 1..100.")
    exclude: Names = Field(default=[], description="Item ids never to return (e.g. already in the cart).")
    category: Names = Field(default=[], description="Only items in any of these categories.")
    exclude_category: Names = Field(default=[], description="No items in any of these categories.")
    tag: Names = Field(default=[], description="Only items with any of these tags.")
    exclude_tag: Names = Field(default=[], description="No items with any of these tags.")
    diversity: float = Field(
        default=0.0, ge=0, le=1, description="MMR trade-off: 0 = pure relevance, 1 = maximally diverse."
    )
    max_per_category: int | None = Field(default=None, ge=1, le=100, description="At most this many per category.")
    explain: bool = Field(default=False, description="Add a reason per item: the seen item closest to it.")

    def filters(self) -> tuple[tuple[str, ...], ...]:
        return tuple(self.category), tuple(self.exclude_category), tuple(self.tag), tuple(self.exclude_tag)

    @property
    def reranks(self) -> bool:
        return self.diversity > 0 or self.max_per_category is not None


class Reason(BaseModel):
    because_item_id: str = Field(description="The user's seen item most similar to this recommendation.")
    text: str


class ScoredItem(BaseModel):
    item_id: str
    score: float
    reason: Reason | None = None


class Recommendations(BaseModel):
    tenant: str
    user_id: str
    release_id: str
    recommendation_id: str = Field(description="Unique id of this response, for click/feedback attribution.")
    fallback: bool = Field(description="True when popular items are served instead of personal ones.")
    fallback_reason: str | None = Field(default=None, description="Why the fallback was served.")
    degraded: bool = Field(
        default=False,
        description="True when the user store (Redis) was down or slow: the release's own files answered "
        "(users it holds stay personal; fold-ins since the release are not seen).",
    )
    items: list[ScoredItem]


class SimilarItems(BaseModel):
    tenant: str
    item_id: str
    release_id: str
    recommendation_id: str
    items: list[ScoredItem]


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_ids: list[ItemId] = Field(min_length=1, max_length=1000, description="Candidates to order for the user.")


class Ranked(BaseModel):
    tenant: str
    user_id: str
    release_id: str
    recommendation_id: str
    fallback: bool
    fallback_reason: str | None = None
    degraded: bool = Field(
        default=False,
        description="True when the user store (Redis) was down or slow: the release's own files answered "
        "(users it holds stay personal; fold-ins since the release are not seen).",
    )
    items: list[ScoredItem] = Field(description="Known candidates, best first.")
    unknown_item_ids: list[str] = Field(description="Candidates this release does not know (not ranked).")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_ids: list[UserId] = Field(min_length=1, max_length=1000)
    options: Options = Options()


class BatchRecommendations(BaseModel):
    tenant: str
    release_id: str = Field(description="Every result comes from this one release.")
    degraded: bool = Field(default=False, description="True when any result is degraded (see Recommendations).")
    results: list[Recommendations]


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserId
    item_id: ItemId
    event_id: EventId | None = Field(
        default=None,
        description="Your id of this event, unique per tenant: send one per event so retries are stored once. "
        "Without it an event with a timestamp is deduplicated on (user, item, type, timestamp); "
        "one with neither is not deduplicated.",
    )
    timestamp: Annotated[datetime | None, BeforeValidator(_iso_only)] = Field(
        default=None,
        description="ISO 8601 time it happened (default: when received; a time up to the skew allowance "
        "after the receive time is stored as the receive time). Late events are kept: the log files "
        "them under the day they arrived, so the next run trains on them.",
    )
    event_type: Annotated[str, AfterValidator(_utf8)] = Field(default="interaction", min_length=1, max_length=64)
    rating: float | None = Field(default=None, allow_inf_nan=False, strict=True)  # true/false is no rating


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[Event] = Field(min_length=1, max_length=1000)


class RejectedEvent(BaseModel):
    index: int = Field(description="Position of the event in the request.")
    reason: str


class EventsAccepted(BaseModel):
    tenant: str
    release_id: str
    accepted: int = Field(description="Events appended to the tenant's event log (read by the next extract).")
    users_folded_in: int = Field(description="Users whose vectors were updated now, without retraining.")
    unknown_item_ids: list[str] = Field(description="Items the live release does not know: logged, not folded in.")
    rejected: list[RejectedEvent] = Field(default=[], description="Events not accepted (e.g. stamped in the future).")
    degraded: bool = Field(
        default=False,
        description="True when the user store was unavailable: the events are logged (the next run learns "
        "them) but users were not folded in now.",
    )


class Error(BaseModel):
    detail: str


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="ok, loading (503) or partial (the ready timeout passed first).")
    loaded: int = Field(description="Configured tenants (RECSYS_SERVING_TENANTS) with a release loaded.")
    expected: int = Field(description="Configured tenants.")
    tenants: dict[str, str] | None = Field(
        default=None, description="tenant -> live release id; only with the admin token (RECSYS_ADMIN_TOKEN)."
    )

"""Request and response models of the HTTP API (they are the OpenAPI contract)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_K = 100
MAX_BATCH_USERS = 1000
MAX_EVENTS = 1000
MAX_RANK_ITEMS = 1000
MAX_WORK_UNITS = 100_000  # users x candidates of one batch: 1,000 users x k=100, or 200 users x a 500 pool


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


def candidates(k: int, reranks: bool) -> int:
    """The candidate pool scored per user: k, or the wider pool (5k, at least 50) a re-ranking picks from."""
    return max(k * 5, 50) if reranks else k


def work_units(n_users: int, k: int, reranks: bool) -> int:
    """Cost of a request in users x candidates: what the per-tenant work quota charges."""
    return n_users * candidates(k, reranks)


class Options(BaseModel):
    """What to recommend: how many, which items may appear, and how to order them."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(default=10, ge=1, le=MAX_K, description="Number of items, 1..100.")
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
    variant: str | None = Field(
        default=None,
        description="The experiment arm this response served (`interleaved` for two interleaved arms); "
        "null outside any experiment.",
    )


class SimilarItems(BaseModel):
    tenant: str
    item_id: str
    release_id: str
    recommendation_id: str
    items: list[ScoredItem]
    variant: str | None = Field(default=None, description="Always null: experiments split users, not items.")


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_ids: list[ItemId] = Field(
        min_length=1, max_length=MAX_RANK_ITEMS, description="Candidates to order for the user (at most 1,000)."
    )


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
    variant: str | None = Field(default=None, description="Always null: the caller chose the candidates.")


class BatchRequest(BaseModel):
    """At most 1,000 users, and at most 100,000 users x candidates (the candidates are k, or the
    re-ranking pool of max(5k, 50) with diversity or max_per_category): 422 beyond."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[UserId] = Field(min_length=1, max_length=MAX_BATCH_USERS, description="1..1,000 user ids.")
    options: Options = Options()

    @model_validator(mode="after")
    def _bounded_work(self) -> BatchRequest:
        units = work_units(len(self.user_ids), self.options.k, self.options.reranks)
        if units > MAX_WORK_UNITS:
            raise ValueError(
                f"{len(self.user_ids)} users x {candidates(self.options.k, self.options.reranks)} candidates = "
                f"{units} is over the limit of {MAX_WORK_UNITS} per request; send fewer users or a smaller k"
            )
        return self


class BatchRecommendations(BaseModel):
    tenant: str
    release_id: str = Field(
        description="The tenant's live release; every result comes from it, except those of users in an "
        "experiment arm serving another release (each result names its own release_id and variant)."
    )
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
    recommendation_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="The `recommendation_id` of the response the user acted on: the event is attributed to "
        "that impression (its experiment arm) in the experiment reports.",
    )
    position: int | None = Field(
        default=None, ge=0, le=999, description="0-based position of the item in that response, if known."
    )


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[Event] = Field(min_length=1, max_length=MAX_EVENTS, description="1..1,000 events.")


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


# the error answers of the routes, for the OpenAPI document
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "Missing API key."},
    403: {"model": Error, "description": "The key is not one of this tenant's."},
    404: {"model": Error, "description": "Unknown tenant (nothing published) or unknown item."},
    429: {"model": Error, "description": "The tenant's rate limit or work quota is exceeded; see Retry-After."},
    503: {
        "model": Error,
        "description": "No release loaded yet (store or Redis unavailable), or the server is at capacity "
        "(load shedding); see Retry-After.",
    },
}
POST_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "The body is not valid JSON."},
    413: {"model": Error, "description": "The body is over RECSYS_MAX_BODY_BYTES (refused unread)."},
    **ERRORS,
}

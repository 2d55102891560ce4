"""Response models of the HTTP API (they are the OpenAPI contract)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ScoredItem(BaseModel):
    item_id: str
    score: float


class Recommendations(BaseModel):
    tenant: str
    user_id: str
    release_id: str
    recommendation_id: str = Field(description="Unique id of this response, for click/feedback attribution.")
    fallback: bool = Field(description="True when the user is unknown to the release and popular items are served.")
    fallback_reason: str | None = None
    items: list[ScoredItem]


class SimilarItems(BaseModel):
    tenant: str
    item_id: str
    release_id: str
    recommendation_id: str
    items: list[ScoredItem]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    tenants: dict[str, str | None] = Field(description="tenant -> live release id (None: not loadable).")

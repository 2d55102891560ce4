"""Every artifact key comes from here, so a stage's outputs depend only on (tenant, run)."""

from __future__ import annotations


def run_prefix(tenant: str, run_id: str) -> str:
    return f"tenants/{tenant}/runs/{run_id}"


def stage_key(tenant: str, run_id: str, stage: str, name: str) -> str:
    return f"{run_prefix(tenant, run_id)}/{stage}/{name}"


def releases_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/releases"


def release_key(tenant: str, release_id: str, name: str) -> str:
    return f"{releases_prefix(tenant)}/{release_id}/{name}"


def pointer_key(tenant: str) -> str:
    return f"tenants/{tenant}/current.json"


def events_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/events"


def history_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/history"

"""The tenant's release pointer `tenants/{t}/current.json`, its release order, pins and blocklist.

The release order. A release R may replace the live release L only when:
  * R's `data_interval_end` is strictly later than L's (compared as instants, not strings);
    an equal interval with another release id is refused (SAME_INTERVAL): of two runs of one
    interval the first to flip wins and the loser never flips, not even on retry; the same
    release id again is an idempotent no-op (ALREADY_LIVE);
  * the tenant is not pinned (a rollback pins it; only `unpin` lifts it);
  * R is not on the tenant's blocklist (every release a rollback moved away from).
A rollback moves backwards explicitly (`allow_backwards`), and only from the release it read.

Every move of the pointer increments its `generation`: the order of the store pointer's
states, which the Redis pointer copies (`refresh.flip` moves Redis only to a higher
generation), so a slow or retried refresh can never move Redis back to a state the store has
left, and a rollback (a higher generation) is followed like any other move.

The flip is a conditional put (etag / If-Match; If-None-Match for the first), so every check
above holds against concurrent writers: a pin or a newer release written after our read makes
our put fail (LOST_RACE) instead of being overwritten. The pin lives in the pointer document
itself for that reason; `pin.json` is a mirror for readers (retention, people), written after
the flip and deleted after the unpin, so it covers at least the pinned window.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.storage import ObjectStore, PreconditionFailed, codecs, paths

CAS_ATTEMPTS = 20  # read-modify-conditional-put retries for the small shared documents


@dataclass
class Pointer:
    release_id: str
    data_interval_end: str
    previous_release_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    generation: int = 0  # set by flip_pointer: the live generation + 1
    pinned: dict[str, Any] | None = None  # set by rollback / pin: {release_id, reason, by, at, ...}

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            **self.extra,
            "release_id": self.release_id,
            "data_interval_end": self.data_interval_end,
            "previous_release_id": self.previous_release_id,
            "generation": self.generation,
        }
        if self.pinned is not None:
            doc["pinned"] = self.pinned
        return codecs.json_bytes(doc)


def read_pointer(store: ObjectStore, tenant: str) -> tuple[dict[str, Any], str] | None:
    """The pointer document and its etag, or None when the tenant has never published."""
    got = store.get_with_etag(paths.pointer_key(tenant))
    if got is None:
        return None
    return json.loads(got[0]), got[1]


def interval_instant(value: str) -> datetime:
    """`data_interval_end` as an instant (naive means UTC), so '+00:00' and 'Z' spellings compare right."""
    dt = datetime.fromisoformat(value)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def generation_of(doc: dict[str, Any] | None) -> int:
    """The pointer's generation (0: never published, or a pointer written before generations)."""
    return int(doc.get("generation", 0)) if doc else 0


def read_blocklist(store: ObjectStore, tenant: str) -> dict[str, Any]:
    """{release_id: {reason, by, at, ...}} of releases that may never be made live by a publish."""
    key = paths.blocklist_key(tenant)
    if not store.exists(key):
        return {}
    return dict(codecs.read_json(store.get(key)).get("releases", {}))


def add_to_blocklist(store: ObjectStore, tenant: str, release_id: str, record: dict[str, Any]) -> None:
    """Append with a conditional put (two rollbacks at once both land), never drop an entry."""
    key = paths.blocklist_key(tenant)
    for _ in range(CAS_ATTEMPTS):
        got = store.get_with_etag(key)
        doc = json.loads(got[0]) if got else {"releases": {}}
        doc["releases"][release_id] = record
        try:
            store.put_if(key, codecs.json_bytes(doc), etag=got[1] if got else None)
            return
        except PreconditionFailed:
            continue
    raise PreconditionFailed(
        f"tenant {tenant}: blocklist kept changing under {CAS_ATTEMPTS} attempts to add {release_id}"
    )


def read_pin(store: ObjectStore, tenant: str) -> dict[str, Any] | None:
    """The pin as the pointer document records it (authoritative), or None."""
    current = read_pointer(store, tenant)
    return current[0].get("pinned") if current else None


class FlipOutcome(enum.Enum):
    MOVED = "moved"
    ALREADY_LIVE = "already_live"
    OLDER_THAN_LIVE = "older_than_live"  # refused: the pointer never moves backwards (but rollback)
    SAME_INTERVAL = "same_interval"  # refused: another release of this interval flipped first
    PINNED = "pinned"  # refused: a rollback (or pin) holds the tenant until a person unpins
    BLOCKLISTED = "blocklisted"  # refused: a rollback moved away from this release
    LOST_RACE = "lost_race"  # another writer moved the pointer between our read and our write


@dataclass(frozen=True)
class Flip:
    """What a pointer flip did; `reason` is the human-readable line publish reports."""

    outcome: FlipOutcome
    reason: str
    generation: int | None = None  # the pointer's generation after a MOVED flip

    @property
    def moved(self) -> bool:
        return self.outcome is FlipOutcome.MOVED


def pinned_reason(tenant: str, pin: dict[str, Any]) -> str:
    return (
        f"tenant {tenant} pinned at {pin.get('release_id')} by {pin.get('kind', 'pin')} "
        f"({pin.get('by', '?')}: {pin.get('reason', '')}): pointer not moved; "
        f"lift it with: python -m pipeline unpin {tenant}"
    )


def refusal(
    store: ObjectStore, tenant: str, doc: dict[str, Any] | None, release_id: str, interval_end: str
) -> Flip | None:
    """Why a forward flip to `release_id` must not happen now (None: it may). No writes."""
    if doc is not None and doc["release_id"] == release_id:
        return Flip(FlipOutcome.ALREADY_LIVE, f"already live: {release_id}")
    if doc is not None and doc.get("pinned"):
        return Flip(FlipOutcome.PINNED, pinned_reason(tenant, doc["pinned"]))
    blocked = read_blocklist(store, tenant).get(release_id)
    if blocked is not None:
        return Flip(
            FlipOutcome.BLOCKLISTED,
            f"release {tenant}/{release_id} is blocklisted ({blocked.get('reason', '')}, by "
            f"{blocked.get('by', '?')}): a rollback moved away from it; pointer not moved",
        )
    if doc is None:
        return None
    live, new = interval_instant(doc["data_interval_end"]), interval_instant(interval_end)
    if live > new:
        return Flip(
            FlipOutcome.OLDER_THAN_LIVE,
            f"live release {doc['release_id']} covers data up to {doc['data_interval_end']}, "
            f"newer than {interval_end}: pointer not moved backwards",
        )
    if live == new:
        return Flip(
            FlipOutcome.SAME_INTERVAL,
            f"live release {doc['release_id']} is of the same interval ({interval_end}) and flipped "
            f"first: pointer not moved (the first release of an interval wins)",
        )
    return None


def flip_pointer(
    store: ObjectStore,
    tenant: str,
    pointer: Pointer,
    *,
    allow_backwards: bool = False,
    expect_release: str | None = None,
) -> Flip:
    """Point the tenant at `pointer.release_id` if the release order allows it (module docstring).

    allow_backwards (rollback): skips the order, pin and blocklist checks; with
    `expect_release` it moves only from that live release (else LOST_RACE), so a rollback
    never undoes a publish it did not see. A concurrent writer makes the conditional put fail
    (LOST_RACE), never a silent overwrite.
    """
    current = read_pointer(store, tenant)
    doc, etag = current if current is not None else (None, None)
    if expect_release is not None and (doc or {}).get("release_id") != expect_release:
        live = (doc or {}).get("release_id")
        return Flip(FlipOutcome.LOST_RACE, f"another publisher moved the pointer first (to {live})")
    if not allow_backwards:
        refused = refusal(store, tenant, doc, pointer.release_id, pointer.data_interval_end)
        if refused is not None:
            return refused
    elif doc is not None and doc["release_id"] == pointer.release_id and doc.get("pinned") == pointer.pinned:
        return Flip(FlipOutcome.ALREADY_LIVE, f"already live: {pointer.release_id}")
    if doc is not None:
        pointer.previous_release_id = doc["release_id"]
    pointer.generation = generation_of(doc) + 1
    try:
        store.put_if(paths.pointer_key(tenant), pointer.to_bytes(), etag=etag)
    except PreconditionFailed as exc:
        return Flip(FlipOutcome.LOST_RACE, f"another publisher moved the pointer first ({exc})")
    return Flip(FlipOutcome.MOVED, f"live: {pointer.release_id}", pointer.generation)


def set_pin(store: ObjectStore, tenant: str, pin: dict[str, Any] | None) -> dict[str, Any]:
    """Pin the tenant at its live release (pin: the record) or unpin it (None), by conditional put.

    The release and generation stay; only the pointer document's `pinned` changes. Then the
    `pin.json` mirror is written or deleted. Returns the pointer document written.
    """
    for _ in range(CAS_ATTEMPTS):
        current = read_pointer(store, tenant)
        if current is None:
            raise PreconditionFailed(f"tenant {tenant}: nothing published, nothing to pin")
        doc, etag = current
        new = {k: v for k, v in doc.items() if k != "pinned"}
        if pin is not None:
            new["pinned"] = {**pin, "release_id": doc["release_id"]}
        try:
            store.put_if(paths.pointer_key(tenant), codecs.json_bytes(new), etag=etag)
            break
        except PreconditionFailed:
            continue
    else:
        raise PreconditionFailed(
            f"tenant {tenant}: the pointer kept moving under {CAS_ATTEMPTS} attempts to (un)pin it"
        )
    if pin is not None:
        write_pin_record(store, tenant, new["pinned"], doc["data_interval_end"])
    else:
        store.delete(paths.pin_key(tenant))
    return new


def write_pin_record(store: ObjectStore, tenant: str, pin: dict[str, Any], interval_end: str) -> None:
    """`tenants/{t}/pin.json`: the pinned release for readers that do not parse the pointer (retention)."""
    store.put(paths.pin_key(tenant), codecs.json_bytes({**pin, "pinned_at_interval_end": interval_end}))

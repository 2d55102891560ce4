"""Failure notifications: one log line with tenant, run and reason, and an optional webhook.

The webhook (RECSYS_ALERT_WEBHOOK_URL, e.g. a Slack/Teams/PagerDuty incoming hook) gets a
JSON POST; a webhook that is down never fails the callback. The URL often embeds a token,
so it is never logged (only its host).
"""

from __future__ import annotations

import json
import logging
import urllib.request
from urllib.parse import urlsplit

from pipeline.config import get_settings

log = logging.getLogger(__name__)


def notify_failure(
    tenant: str,
    dag_id: str,
    run_id: str,
    task_id: str,
    reason: str,
    webhook_url: str | None = None,
    timeout: float = 5.0,
) -> bool:
    """Returns True when a webhook accepted the message."""
    reason = reason.strip()[:4000]
    log.error(
        "task failed: tenant=%s dag_id=%s run_id=%s task_id=%s reason=%s", tenant, dag_id, run_id, task_id, reason
    )
    url = webhook_url if webhook_url is not None else get_settings().alert_webhook_url
    if not url:
        return False
    body = json.dumps(
        {
            "text": f"recsys {tenant}: {task_id} failed in {run_id}: {reason}",
            "tenant": tenant,
            "dag_id": dag_id,
            "run_id": run_id,
            "task_id": task_id,
            "reason": reason,
        }
    ).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (configured by operators)
            return 200 <= response.status < 300
    except Exception as exc:  # never let alerting break the callback
        log.warning("alert webhook at %s failed: %s", urlsplit(url).hostname, type(exc).__name__)
        return False

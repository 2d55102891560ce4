"""`[core] hostname_callable` for the Celery test: each worker names itself (RECSYS_TEST_WORKER),
so the task instances it ran say which worker ran them, though both run on this machine."""

import os
import socket


def worker_name() -> str:
    return os.environ.get("RECSYS_TEST_WORKER") or socket.getfqdn()

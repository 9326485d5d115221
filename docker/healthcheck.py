"""Container health checks for compose.yaml: `python docker/healthcheck.py web|worker|beat|node`; exit 0 is healthy."""
from __future__ import annotations

import http.client
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root, for deepopt_web


def web() -> bool:
    # Any answer below 500 means Django is serving (a redirect to HTTPS or a 400 for the Host is fine).
    # The port is compose's 8000; HEALTHCHECK_PORT lets tests/integration/test_compose_services.py run it.
    port = int(os.environ.get("HEALTHCHECK_PORT", "8000"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("GET", "/login/", headers={"Host": "localhost"})
    return connection.getresponse().status < 500


def worker() -> bool:
    # The worker answers a ping sent through the broker: it is alive and consuming.
    from deepopt_web.celery import app

    return bool(app.control.ping(destination=[f"worker@{socket.gethostname()}"], timeout=5))


def beat() -> bool:
    # Beat does not answer pings; it is healthy when it is the container's process and the broker answers.
    from deepopt_web.celery import app

    if b"beat" not in Path("/proc/1/cmdline").read_bytes():
        return False
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
    return True


def node() -> bool:
    # A GPU node: the agent is the container's process, and the node's worker (the agent names it
    # node.<name>@<hostname>, after its queue) answers a ping. Another worker of this hostname, as on a
    # host network beside compose's `worker@…`, does not count.
    from workers.celery_app import app

    if b"workers.agent" not in Path("/proc/1/cmdline").read_bytes():
        return False
    replies = app.control.ping(timeout=5)
    return any(name.startswith("node.") and name.endswith(f"@{socket.gethostname()}")
               for reply in replies for name in reply)


if __name__ == "__main__":
    checks = {"web": web, "worker": worker, "beat": beat, "node": node}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(checks)}")
    try:
        healthy = checks[sys.argv[1]]()
    except Exception as exc:  # any failure to answer is "unhealthy", with the reason in the health log
        print(f"unhealthy: {exc}")
        sys.exit(1)
    sys.exit(0 if healthy else 1)

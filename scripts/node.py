"""`make worker NAME=… SLOTS=…`: one more local node, in the foreground, for a `make run` on this machine.

Registers the node (or finds it) in the same database `make run` uses (DATABASE_URL), keeps its token
under var/nodes/<name>/token, then becomes its agent (workers/agent.py), which starts the node's Celery
worker on queue node.<name> and heartbeats to the web app on PORT. Ctrl-C stops both; the web app
retries whatever attempt was running.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=os.environ.get("NAME") or "local-2")
    parser.add_argument("--slots", type=int, default=int(os.environ.get("SLOTS") or 2))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8000))
    args = parser.parse_args()
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "deepopt_web.settings.local")
    env["PYTHONUNBUFFERED"] = "1"
    registered = subprocess.run(  # noqa: S603 - our own manage.py
        [PYTHON, "manage.py", "ensure_local_node", "--name", args.name, "--slots", str(args.slots)],
        cwd=ROOT, env=env, check=False)
    if registered.returncode != 0:
        print("deepopt: could not register the node (is the database migrated? run `make run` first).",
              file=sys.stderr)
        return registered.returncode
    print(f"deepopt: node {args.name} reports to http://127.0.0.1:{args.port}/ (Ctrl-C stops it)", flush=True)
    agent = [PYTHON, "-m", "workers.agent", "--server", f"http://127.0.0.1:{args.port}",
             "--token-file", str(ROOT / "var" / "nodes" / args.name / "token"), "--cpu-slots", str(args.slots)]
    os.chdir(ROOT)
    os.execve(PYTHON, agent, env)  # noqa: S606 - the agent replaces us: Ctrl-C reaches it directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

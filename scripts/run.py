"""`make run`: everything DeepOpt needs on one machine, stopped together on Ctrl-C.

Migrates, makes the first admin and this machine's local node (`ensure_local_node`: its GPUs, or SLOTS
CPU slots, default 2; DEEPOPT_LOCAL_NODE names it, `off` starts none), makes sure Redis answers on
REDIS_URL (starting a local one when it does not), then runs the web server, a Celery worker, Celery
beat and the local node's agent (which starts the node's own worker on queue node.<name>) as children.
Each child gets its own process group, so Ctrl-C reaches only this supervisor, which then stops the
children in order and waits for them; if one child dies, the rest are stopped and the exit status is
non-zero.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"
PYTHON = sys.executable
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def web_command(port: int) -> list[str]:
    """The web server, in one place: swapping daphne for another ASGI server is a change here only."""
    return [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "deepopt_web.asgi:application"]


def worker_command() -> list[str]:
    return [PYTHON, "-m", "celery", "-A", "deepopt_web", "worker", "-Q", "default", "-c", "2",
            "-n", "default@%h", "--loglevel", "info"]


def beat_command() -> list[str]:
    return [PYTHON, "-m", "celery", "-A", "deepopt_web", "beat", "--loglevel", "info",
            "--schedule", str(VAR / "celerybeat-schedule")]


def node_command(name: str, port: int, slots: int) -> list[str]:
    """A local node: its agent registers it with the web app and starts its Celery worker (workers/agent.py)."""
    return [PYTHON, "-m", "workers.agent", "--server", f"http://127.0.0.1:{port}",
            "--token-file", str(VAR / "nodes" / name / "token"), "--cpu-slots", str(slots)]


def local_node_name(env: dict[str, str]) -> str | None:
    name = (env.get("DEEPOPT_LOCAL_NODE") or "local-1").strip()
    return None if name.lower() in {"off", "none", "0", "no"} else name


def say(message: str) -> None:
    print(f"deepopt: {message}", flush=True)


def fail(message: str) -> None:
    print(f"deepopt: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


@dataclass
class Child:
    name: str
    process: subprocess.Popen

    def alive(self) -> bool:
        return self.process.poll() is None


class Supervisor:
    def __init__(self) -> None:
        self.children: list[Child] = []
        self.stop_requested = False

    def start(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        # A process group of its own: the terminal's Ctrl-C then reaches only us, and we stop each
        # child (and anything it forked, such as prefork pool processes) in our own order.
        process = subprocess.Popen(command, cwd=ROOT, env=env, process_group=0)  # noqa: S603
        child = Child(name, process)
        self.children.append(child)
        return child

    def request_stop(self, signum: int, _frame: object) -> None:
        if self.stop_requested:
            return
        self.stop_requested = True
        say(f"{signal.Signals(signum).name} received, stopping.")

    def dead_child(self) -> Child | None:
        return next((child for child in self.children if not child.alive()), None)

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM (a warm shutdown for Celery), then SIGKILL to whatever is left after `timeout`.

        Local nodes go first, while the web app can still hear their reports (a running attempt is
        reported interrupted, to be retried); Redis, when we started it, goes last, so the workers and
        beat can still close their connections.
        """
        redis = [child for child in self.children if child.name == "redis-server"]
        nodes = [child for child in self.children if child.name.startswith("local node")]
        rest = [child for child in self.children if child not in redis and child not in nodes]
        for batch in (nodes, rest, redis):
            for child in batch:
                if child.alive():
                    _signal_group(child.process, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for child in batch:
                try:
                    child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    say(f"the {child.name} did not stop in {timeout:.0f} s; killing it.")
                    _signal_group(child.process, signal.SIGKILL)
                    child.process.wait()
                # Leftovers of the group (a pool process whose parent is gone) must not outlive us.
                _signal_group(child.process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


# Migrate and make the admin in one interpreter: each Django start-up costs about two seconds.
# Migrate's progress is swallowed; ensure_admin prints the generated password (once) to stdout.
BOOTSTRAP = """
import io, os, django
django.setup()
from django.core.management import call_command
call_command("migrate", interactive=False, stdout=io.StringIO())
call_command("ensure_admin")
if os.environ.get("DEEPOPT_BOOTSTRAP_NODE"):
    call_command("ensure_local_node", "--name", os.environ["DEEPOPT_BOOTSTRAP_NODE"],
                 "--slots", os.environ["DEEPOPT_BOOTSTRAP_SLOTS"])
# A first start gets four weeks of realistic load history, so the charts and forecasts mean something.
from apps.cluster.models import Gpu
if Gpu.objects.exists():
    call_command("seed_history")
# The first forecasts now rather than at beat's first refresh, five minutes from now (a few seconds:
# one Prophet fit per series with data; later refits are daily and cached).
from apps.forecasting.services import latest_forecast, refresh_forecasts
from datetime import timedelta
if latest_forecast("cluster:all:allocated_gpus", max_age=timedelta(minutes=10)) is None:
    refresh_forecasts()
"""


def bootstrap(env: dict[str, str], node: str | None = None, slots: int = 2) -> str:
    if node:
        env = {**env, "DEEPOPT_BOOTSTRAP_NODE": node, "DEEPOPT_BOOTSTRAP_SLOTS": str(slots)}
    result = subprocess.run([PYTHON, "-c", BOOTSTRAP], cwd=ROOT, env=env,  # noqa: S603
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        fail(f"migrating the database or making the admin failed (exit {result.returncode}); see above.")
    return result.stdout.strip()


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def is_local(host: str) -> bool:
    return host in {"127.0.0.1", "localhost", "::1", ""}


def may_install_packages() -> bool:
    if os.geteuid() == 0:
        return True
    if shutil.which("sudo") is None:
        return False
    return subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False).returncode == 0  # noqa: S607


def install_redis_server() -> None:
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say("redis-server is not installed; installing Debian's redis-server with apt-get.")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        if subprocess.run([*prefix, *command], env=env, check=False).returncode != 0:  # noqa: S603
            fail(f"`{' '.join(command)}` failed; install redis-server yourself and run make run again.")


def ensure_redis(url: str, supervisor: Supervisor, env: dict[str, str]) -> None:
    if redis_answers(url):
        say(f"Redis answers on {url}.")
        return
    parts = urlsplit(url)
    if not is_local(parts.hostname or ""):
        fail(f"Redis does not answer on {url}, and it is not on this machine, so make run cannot start it.")
    if shutil.which("redis-server") is None:
        if not may_install_packages():
            fail("Redis is not running and redis-server is not installed: install it (Debian/Ubuntu: "
                 "sudo apt-get install redis-server; macOS: brew install redis), then run make run again.")
        install_redis_server()
        if shutil.which("redis-server") is None:
            fail("apt-get installed redis-server but it is not on PATH; add /usr/bin to PATH and run make run again.")
    port = parts.port or 6379
    # Redis only carries messages here (PostgreSQL or SQLite holds the truth), so no persistence.
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--daemonize", "no", "--dir", str(VAR), "--logfile", str(VAR / "redis.log")]
    say(f"Redis does not answer on {url}; starting redis-server on port {port} (log: var/redis.log).")
    child = supervisor.start("redis-server", command, env)
    deadline = time.monotonic() + 15
    while not redis_answers(url):
        if supervisor.stop_requested:
            supervisor.stop_all()
            raise SystemExit(0)
        if not child.alive() or time.monotonic() > deadline:
            supervisor.stop_all()
            fail(f"redis-server did not come up on port {port}; see var/redis.log.")
        time.sleep(0.2)


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, child: Child, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8000))
    parser.add_argument("--slots", type=int, default=int(os.environ.get("SLOTS") or 2),
                        help="CPU slots of the local node when this machine has no GPU")
    args = parser.parse_args()
    if args.slots < 1:
        fail("SLOTS must be at least 1.")

    VAR.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "deepopt_web.settings.local")
    env["PYTHONUNBUFFERED"] = "1"
    redis_url = env.get("REDIS_URL") or DEFAULT_REDIS_URL
    if not port_is_free(args.port):
        fail(f"port {args.port} is in use; stop what holds it or choose another, e.g. PORT=8001 make run.")

    say("migrating the database")
    node = local_node_name(env)
    notes = bootstrap(env, node, args.slots).splitlines()
    admin_note = "\n".join(line for line in notes if not line.endswith("/token."))
    node_note = next((line for line in notes if line.endswith("/token.")), "")

    supervisor = Supervisor()
    # Handlers before any child starts: a Ctrl-C from here on must still stop what was started.
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    ensure_redis(redis_url, supervisor, env)

    web = supervisor.start("web server", web_command(args.port), env)
    supervisor.start("celery worker", worker_command(), env)
    supervisor.start("celery beat", beat_command(), env)
    if node:
        supervisor.start(f"local node {node}", node_command(node, args.port, args.slots), env)

    if wait_for_port(args.port, web) and not supervisor.stop_requested:
        admin = env.get("DEEPOPT_ADMIN_USER") or "admin"
        say(f"DeepOpt is running at http://127.0.0.1:{args.port}/  (Ctrl-C stops everything)")
        say(admin_note or f"Log in as your existing superuser (make run made it as '{admin}' and showed its "
                          f"password then; `.venv/bin/python manage.py changepassword {admin}` sets a new one).")
        if node_note:
            say(node_note)
    elif web.alive() and not supervisor.stop_requested:
        say(f"the web server has not opened port {args.port} yet; still waiting on it (Ctrl-C stops everything).")

    while not supervisor.stop_requested:
        dead = supervisor.dead_child()
        if dead is not None:
            supervisor.stop_all()
            print(f"deepopt: the {dead.name} exited (status {dead.process.returncode}); stopped the rest.",
                  file=sys.stderr, flush=True)
            return 1
        time.sleep(0.3)
    supervisor.stop_all()
    say("stopped.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before any child was started: nothing to stop
        sys.exit(130)

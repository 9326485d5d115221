"""The node agent: `python -m workers.agent --server URL --token TOKEN [--cpu-slots N]`.

On start it finds the node's GPUs (NVML, from nvidia-ml-py) — or, on a host without one, offers CPU
slots — and registers them with the web app, which answers with the node's name and queue. It then
starts the node's Celery worker (`celery -A workers.celery_app worker -Q node.<name>`, one slot per GPU)
as its child, and every `--interval` seconds (the server's choice by default, 10 s) heartbeats
telemetry: per GPU utilization, memory, temperature and power, and host CPU and memory (psutil). If
the worker dies it is started again. SIGTERM or Ctrl-C stops the worker (which interrupts its running
attempts so the web app retries them) and then the agent.

Environment: DEEPOPT_SERVER, DEEPOPT_NODE_TOKEN (or DEEPOPT_NODE_TOKEN_FILE), DEEPOPT_BROKER_URL (else
REDIS_URL), DEEPOPT_WORK_DIR, DEEPOPT_CPU_SLOTS.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from .client import AgentClient, AgentError, read_token

log = logging.getLogger("deepopt.agent")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CPU_SLOTS = 2


# --- what the host has -------------------------------------------------------------------------

class Nvml:
    """NVML through nvidia-ml-py, when the package and a driver are there; otherwise no GPUs."""

    def __init__(self) -> None:
        self.available = False
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - no package, no driver, no GPU: all mean "no GPUs"
            log.info("No NVIDIA GPUs found (%s).", exc)
            return
        self.nvml = pynvml
        self.available = True

    def handles(self) -> list:
        if not self.available:
            return []
        return [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self.nvml.nvmlDeviceGetCount())]

    def inventory(self) -> list[dict]:
        gpus = []
        for index, handle in enumerate(self.handles()):
            name = self.nvml.nvmlDeviceGetName(handle)
            uuid = self.nvml.nvmlDeviceGetUUID(handle)
            memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({"index": index, "model": _text(name)[:100], "memory_mb": int(memory.total // 2**20),
                         "uuid": _text(uuid)[:100]})
        return gpus

    def samples(self) -> list[dict]:
        samples = []
        for index, handle in enumerate(self.handles()):
            sample: dict = {"index": index}
            for key, read in (
                ("utilization", lambda h: float(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu)),
                ("memory_used_mb", lambda h: int(self.nvml.nvmlDeviceGetMemoryInfo(h).used // 2**20)),
                ("memory_total_mb", lambda h: int(self.nvml.nvmlDeviceGetMemoryInfo(h).total // 2**20)),
                ("temperature_c", lambda h: float(self.nvml.nvmlDeviceGetTemperature(h, 0))),  # 0: the GPU die
                ("power_w", lambda h: self.nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                try:
                    sample[key] = read(handle)
                except Exception:  # noqa: BLE001 - a sensor some boards lack; the rest still count
                    sample[key] = None
            samples.append(sample)
        return samples


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cpu_slots(count: int) -> list[dict]:
    """CPU slots, shown as devices of type cpu; each gets an even share of the host's memory."""
    memory_mb = int(psutil.virtual_memory().total // 2**20 // max(count, 1))
    model = f"CPU slot ({platform.machine() or 'cpu'}, {psutil.cpu_count() or 1} cores shared)"
    return [{"index": i, "model": model[:100], "memory_mb": max(memory_mb, 1), "uuid": ""} for i in range(count)]


def host_sample() -> dict:
    memory = psutil.virtual_memory()
    return {"cpu_percent": psutil.cpu_percent(interval=None), "memory_used_mb": int(memory.used // 2**20),
            "memory_total_mb": int(memory.total // 2**20)}


# --- the agent ----------------------------------------------------------------------------------

class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.token = read_token(args.token, args.token_file)
        self.client = AgentClient(args.server, self.token, timeout=10.0)
        self.nvml = Nvml() if args.device in ("auto", "gpu") else None
        self.stopping = threading.Event()
        self.worker: subprocess.Popen | None = None
        self.node: dict = {}

    def inventory(self) -> tuple[str, list[dict]]:
        gpus = self.nvml.inventory() if self.nvml is not None else []
        if gpus:
            return "gpu", gpus
        if self.args.device == "gpu":
            raise SystemExit("--device gpu, but NVML found no GPU on this host.")
        return "cpu", cpu_slots(self.args.cpu_slots)

    def register(self) -> None:
        device_type, devices = self.inventory()
        body = {"hostname": socket.getfqdn(), "device_type": device_type, "gpus": devices,
                "agent": {"pid": os.getpid(), "python": platform.python_version(), "platform": platform.platform()}}
        delay = 0.5
        while not self.stopping.is_set():
            try:
                _, self.node = self.client.post("register/", body)
                break
            except AgentError as exc:
                if exc.status in (401, 403):
                    raise SystemExit(f"The server refused the node token ({exc.body}).") from exc
                raise SystemExit(f"Registration was refused: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - the web app may still be starting
                log.info("Waiting for the web app at %s (%s).", self.args.server, type(exc).__name__)
                self.stopping.wait(delay)
                delay = min(delay * 2, 5.0)
        for note in self.node.get("notes", []):
            log.warning("%s", note)
        log.info("Registered as node %s (%s, %d %s); queue %s.", self.node.get("name"), self.node.get("state"),
                 len(devices), "GPUs" if device_type == "gpu" else "CPU slots", self.node.get("queue"))
        self.devices = devices

    def interval(self) -> float:
        return self.args.interval or float(self.node.get("heartbeat_interval_s") or 10.0)

    def heartbeat(self) -> None:
        body = {"host": host_sample(), "gpus": self.nvml.samples() if self.nvml is not None else []}
        try:
            _, answer = self.client.post("heartbeat/", body)
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat is retried at the next tick
            log.warning("Heartbeat failed: %s", exc)
            return
        if answer.get("state") != self.node.get("state"):
            log.info("The node is now %s.", answer.get("state"))
        self.node.update(answer)

    def worker_command(self) -> list[str]:
        queue = self.node["queue"]
        concurrency = self.args.concurrency or max(1, len(self.devices))
        return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queue,
                "-n", f"{queue}@{socket.gethostname()}", "--pool", "threads", "-c", str(concurrency),
                "--without-gossip", "--without-mingle", "--loglevel", self.args.worker_loglevel]

    def start_worker(self) -> None:
        env = dict(os.environ, DEEPOPT_SERVER=self.args.server, DEEPOPT_NODE_TOKEN=self.token,
                   DEEPOPT_NODE_NAME=self.node["name"], PYTHONUNBUFFERED="1",
                   DEEPOPT_WORK_DIR=str(self.work_dir()))
        env.pop("DEEPOPT_NODE_TOKEN_FILE", None)
        if self.args.broker:
            env["DEEPOPT_BROKER_URL"] = self.args.broker
        self.worker = subprocess.Popen(self.worker_command(), cwd=ROOT, env=env,  # noqa: S603 - our own command
                                       preexec_fn=_term_with_parent)
        log.info("Started the worker (pid %s) on queue %s.", self.worker.pid, self.node["queue"])

    def work_dir(self) -> Path:
        default = ROOT / "var" / "nodes" / self.node["name"]
        return Path(self.args.work_dir or os.environ.get("DEEPOPT_WORK_DIR") or default)

    def stop_worker(self, timeout: float = 30.0) -> None:
        if self.worker is None or self.worker.poll() is not None:
            return
        self.worker.terminate()  # a warm shutdown: running attempts are stopped and reported interrupted
        try:
            self.worker.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("The worker did not stop in %.0f s; killing it.", timeout)
            self.worker.kill()
            self.worker.wait()

    def run(self) -> int:
        self.register()
        if self.stopping.is_set():
            return 0
        self.work_dir().mkdir(parents=True, exist_ok=True)
        psutil.cpu_percent(interval=None)  # the first reading only sets the baseline
        if not self.args.no_worker:
            self.start_worker()
        restarts = 0
        while not self.stopping.is_set():
            self.heartbeat()
            if self.worker is not None and self.worker.poll() is not None and not self.stopping.is_set():
                restarts += 1
                log.error("The worker exited with status %s; starting it again (restart %d).",
                          self.worker.returncode, restarts)
                self.start_worker()
            self.stopping.wait(self.interval())
        try:
            self.client.post("offline/")  # nothing new is placed here while the worker hands work back
        except Exception as exc:  # noqa: BLE001 - the web app may be stopping too
            log.warning("Could not report the node offline (%s).", exc)
        self.stop_worker()
        log.info("Agent stopped.")
        return 0


def _term_with_parent() -> None:
    # If the agent is killed outright, its worker gets SIGTERM: a warm shutdown, not an orphan.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers.agent", description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("DEEPOPT_SERVER"),
                        help="the web app's URL, e.g. https://deepopt.example.org (env DEEPOPT_SERVER)")
    parser.add_argument("--token", help="the node token (env DEEPOPT_NODE_TOKEN); prefer the env or --token-file")
    parser.add_argument("--token-file", help="a file holding the node token (env DEEPOPT_NODE_TOKEN_FILE)")
    parser.add_argument("--cpu-slots", type=int, default=int(os.environ.get("DEEPOPT_CPU_SLOTS") or DEFAULT_CPU_SLOTS),
                        help=f"slots to offer when the host has no GPU (default {DEFAULT_CPU_SLOTS})")
    parser.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto",
                        help="auto: GPUs if NVML finds any, else CPU slots")
    parser.add_argument("--interval", type=float, help="seconds between heartbeats (default: the server's, 10)")
    parser.add_argument("--concurrency", type=int, help="attempts run at once (default: one per GPU or slot)")
    parser.add_argument("--broker", help="the Celery broker URL (env DEEPOPT_BROKER_URL, else REDIS_URL)")
    parser.add_argument("--work-dir", help="where attempts keep their files (default var/nodes/<name>)")
    parser.add_argument("--no-worker", action="store_true", help="heartbeat only; run the worker yourself")
    parser.add_argument("--worker-loglevel", default="info")
    args = parser.parse_args(argv)
    if not args.server:
        parser.error("give --server URL or set DEEPOPT_SERVER")
    if args.cpu_slots < 1:
        parser.error("--cpu-slots must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s agent: %(message)s")
    args = parse(sys.argv[1:] if argv is None else argv)
    agent = Agent(args)

    def stop(signum: int, _frame: object) -> None:
        log.info("%s received; stopping.", signal.Signals(signum).name)
        agent.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())

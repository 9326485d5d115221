"""The node worker's task: run one rank of a job attempt as a runner subprocess and report on it.

    claim (first progress report) → spawn the runner → relay its JSON lines as progress every second
    → stop it when the web app says so (cancel, a newer attempt, the job ended), when its walltime is
      up, or when this worker shuts down → upload its artifacts → report the result.

The claim makes a twice-delivered message harmless (the second run gets 409 and does nothing), and
every report carries job, attempt, rank and run id, so a stale or repeated one changes nothing.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from celery.signals import worker_shutting_down

from .celery_app import app
from .client import AgentClient, AgentError, read_token
from .jsonsafe import json_safe
from .runner import (
    KILL_GRACE_S,
    BadJob,
    RunnerProcess,
    build_command,
    checkpoint_dir,
    final_weights,
    runner_env,
    weights_path,
)

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SHUTDOWN = threading.Event()
# When rank 0 has ended a multi-node job as succeeded, the other ranks are finishing too: let them.
RANK_FINISH_GRACE_S = 15.0
RESULT_RETRY_S = 600.0  # a result outlives a web app restart; after that the reconciler decides
# How long a preempted runner has between SIGTERM and SIGKILL: a step and a checkpoint of a training run
# (DEEPOPT_PREEMPT_GRACE_S; a cancel or a shutdown keeps runner.KILL_GRACE_S).
PREEMPT_GRACE_S = float(os.environ.get("DEEPOPT_PREEMPT_GRACE_S", "30"))
SHUTDOWN_RETRY_S = 10.0


@worker_shutting_down.connect
def _on_shutdown(**_kwargs) -> None:  # noqa: ANN003
    # A warm shutdown waits for running tasks: each stops its runner and reports the attempt as
    # interrupted, so the web app retries it at once instead of waiting for the reconciler. The node
    # is reported offline first, so that the retry is not placed on this node again.
    try:
        config = NodeConfig.from_env()
        AgentClient(config.server, config.token, timeout=3.0).post("offline/")
    except Exception as exc:  # noqa: BLE001 - the web app may be stopping too; the reconciler copes
        log.warning("Could not report the node offline (%s).", exc)
    SHUTDOWN.set()


@dataclass(frozen=True)
class NodeConfig:
    server: str
    token: str
    name: str
    work_dir: Path
    poll_s: float = 1.0
    progress_s: float = 1.0

    @classmethod
    def from_env(cls) -> NodeConfig:
        name = os.environ.get("DEEPOPT_NODE_NAME", "")
        server = os.environ.get("DEEPOPT_SERVER", "")
        if not server:
            raise RuntimeError("DEEPOPT_SERVER is not set: the worker cannot report (start it with workers.agent).")
        work_dir = Path(os.environ.get("DEEPOPT_WORK_DIR") or ROOT / "var" / "nodes" / (name or "node"))
        return cls(server=server, token=read_token(), name=name, work_dir=work_dir,
                   poll_s=float(os.environ.get("DEEPOPT_POLL_S", "1.0")),
                   progress_s=float(os.environ.get("DEEPOPT_PROGRESS_S", "1.0")))


@dataclass
class Handle:
    """What the poller and the attempt's thread share about one running attempt."""

    job: int
    attempt: int
    rank: int
    run: str
    stop_reason: str = ""
    stop_state: str | None = None  # the job's state when the web app said stop
    wake: threading.Event = field(default_factory=threading.Event)

    def request_stop(self, reason: str, state: str | None = None) -> None:
        if not self.stop_reason:
            self.stop_reason = reason or "stop requested"
            self.stop_state = state
        self.wake.set()


class Controller:
    """One status poll a second for every attempt this worker process runs (not one per attempt): the
    worker notices a cancel within about a second, and the web app sees the worker is alive."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.handles: dict[tuple[int, int, int], Handle] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def register(self, handle: Handle) -> None:
        with self.lock:
            self.handles[(handle.job, handle.attempt, handle.rank)] = handle
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="attempt-poller", daemon=True)
                self.thread.start()

    def unregister(self, handle: Handle) -> None:
        with self.lock:
            self.handles.pop((handle.job, handle.attempt, handle.rank), None)

    def _loop(self) -> None:
        client = AgentClient(self.config.server, self.config.token, timeout=5.0)
        while True:
            time.sleep(self.config.poll_s)
            with self.lock:
                handles = dict(self.handles)
            if not handles:
                continue
            items = [{"job": h.job, "attempt": h.attempt, "rank": h.rank, "run": h.run} for h in handles.values()]
            try:
                _, body = client.post("attempts/", {"attempts": items})
            except Exception as exc:  # noqa: BLE001 - the web app may be restarting; runners go on meanwhile
                log.warning("Status poll failed (%s); runners keep running.", exc)
                continue
            for answer in body.get("attempts", []):
                handle = handles.get((answer["job"], answer["attempt"], answer.get("rank", 0)))
                if handle is not None and answer.get("action") == "stop":
                    handle.request_stop(answer.get("reason", ""), answer.get("state"))


_controller: Controller | None = None
_controller_lock = threading.Lock()


def controller(config: NodeConfig) -> Controller:
    global _controller
    with _controller_lock:
        if _controller is None:
            _controller = Controller(config)
        return _controller


@app.task(name="deepopt.run_attempt", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_attempt(payload: dict) -> dict:
    return execute(payload, NodeConfig.from_env())


class Reporter:
    def __init__(self, config: NodeConfig, payload: dict, run_id: str) -> None:
        self.client = AgentClient(config.server, config.token)
        self.prefix = f"jobs/{payload['job']}/attempts/{payload['attempt']}/"
        self.rank, self.run = payload.get("rank", 0), run_id
        self.seq = 0

    def progress(self, lines: list[dict], *, retry_for: float = 2.0) -> dict:
        """Send lines under the next report number; on failure the number is reused with more lines."""
        body = {"rank": self.rank, "run": self.run, "seq": self.seq + 1, "pid": os.getpid(), "lines": lines}
        status, answer = self.client.post(self.prefix + "progress/", body, retry_for=retry_for, ok=(404, 409))
        self.seq += 1
        return {**answer, "http": status}

    def artifact(self, path: Path, name: str) -> dict:
        with path.open("rb") as handle:
            _, answer = self.client.request(
                "POST", self.prefix + "artifacts/", data={"rank": self.rank, "run": self.run, "name": name},
                files={"file": (name, handle)}, retry_for=60.0, ok=(404, 409, 413))
        return answer

    def result(self, **body) -> dict:
        # While the worker shuts down, a web app that is stopping too must not hold it up for long.
        patience = SHUTDOWN_RETRY_S if SHUTDOWN.is_set() else RESULT_RETRY_S
        _, answer = self.client.post(self.prefix + "result/", {"rank": self.rank, "run": self.run, **body},
                                     retry_for=patience, ok=(404, 409))
        return answer


def execute(payload: dict, config: NodeConfig) -> dict:
    job, attempt, rank = payload["job"], payload["attempt"], payload.get("rank", 0)
    where = f"job {job} attempt {attempt} rank {rank}"
    if config.name and payload.get("node") not in (None, config.name):
        log.error("%s was sent to node %s's queue but this is %s; ignoring it.", where, payload.get("node"),
                  config.name)
        return {"status": "wrong-node"}
    run_id = uuid.uuid4().hex
    reporter = Reporter(config, payload, run_id)
    try:
        claim = reporter.progress([], retry_for=60.0)
    except Exception as exc:  # noqa: BLE001 - unreachable web app: the reconciler sends the attempt again
        log.warning("Could not claim %s (%s); leaving it to the reconciler.", where, exc)
        return {"status": "unclaimed"}
    if claim["http"] != 200 or claim.get("status") != "accepted" or claim.get("stop"):
        log.info("Not running %s: %s", where, claim.get("reason") or claim.get("detail") or claim)
        return {"status": "skipped", "reason": claim.get("reason") or claim.get("detail", "")}

    attempt_dir = config.work_dir / "jobs" / str(job) / f"attempt-{attempt}" / f"rank-{rank}"
    out_dir = attempt_dir / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if payload["kind"] == "compression" and (payload.get("spec") or {}).get("weights"):
            # The team's uploaded weights, from the web app (only to the node the attempt is allocated to).
            size = reporter.client.download(reporter.prefix + "weights/", weights_path(out_dir))
            log.info("Fetched %s bytes of uploaded weights for %s", size, where)
        command = build_command(payload, out_dir, config.work_dir)
        runner = RunnerProcess(command, runner_env(payload), cwd=ROOT, log_path=attempt_dir / "runner.log")
    except (AgentError, BadJob, OSError, KeyError) as exc:
        weights_path(out_dir).unlink(missing_ok=True)
        what = "fetch the uploaded weights" if isinstance(exc, AgentError) else "start the runner"
        reporter.result(status="failed", error=f"Could not {what}: {exc}")
        return {"status": "failed"}
    log.info("Running %s as pid %s: %s", where, runner.pid, " ".join(command[:5]))
    handle = Handle(job, attempt, rank, run_id)
    ctl = controller(config)
    ctl.register(handle)
    try:
        outcome = _relay(runner, reporter, handle, config, payload)
    finally:
        ctl.unregister(handle)
    exit_code = runner.finish()
    # Uploaded weights are fetched again by another attempt; gone before the result is reported, so that
    # whoever sees the job end finds nothing of the team's model left on the node.
    weights_path(out_dir).unlink(missing_ok=True)
    leftovers = runner.drain(limit=10_000)
    if leftovers and outcome is None:
        _send(reporter, leftovers, handle)
    status, error = _status(outcome, exit_code, handle, payload)
    if status in ("succeeded", "failed"):
        _upload(reporter, artifact_files(payload, config, out_dir, attempt_dir / "runner.log", status), rank)
    answer = _report_result(reporter, status, error, exit_code, runner, where)
    shutil.rmtree(out_dir, ignore_errors=True)
    if status == "succeeded":
        # Checkpoints only serve a retry; the final one is an artifact now.
        shutil.rmtree(checkpoint_dir(payload, config.work_dir), ignore_errors=True)
    return {"status": status, "exit_code": exit_code, "answer": answer.get("status")}


def _relay(runner: RunnerProcess, reporter: Reporter, handle: Handle, config: NodeConfig,
           payload: dict) -> str | None:
    """Relay progress until the runner exits; stop it early when told to. Returns why it was stopped."""
    walltime = payload.get("walltime_minutes")
    deadline = time.monotonic() + walltime * 60 if walltime else None
    pending: list[dict] = [{"type": "spawned", "pid": runner.pid, "host": socket.gethostname(),
                            "spawned_at": time.time()}]
    last_sent = 0.0
    finish_by = None
    while True:
        code = runner.poll()
        pending += runner.drain()
        now = time.monotonic()
        if pending and (now - last_sent >= config.progress_s or code is not None) and not handle.stop_reason:
            if _send(reporter, pending[-200:], handle):
                pending = []
            last_sent = now
        if code is not None:
            return None
        reason = None
        if handle.stop_reason and handle.stop_state == "succeeded" and handle.rank > 0 and finish_by is None:
            finish_by = now + RANK_FINISH_GRACE_S  # rank 0 is done; this rank is leaving its last barrier
        if handle.stop_reason and (finish_by is None or now > finish_by):
            reason = "stopped"
        elif SHUTDOWN.is_set():
            reason = "interrupted"
        elif deadline is not None and now > deadline:
            reason = "walltime"
        if reason:
            log.info("Stopping job %s attempt %s (%s).", handle.job, handle.attempt, handle.stop_reason or reason)
            # A preempted training run checkpoints at its next step boundary on SIGTERM: give it time to.
            runner.stop(grace=PREEMPT_GRACE_S if handle.stop_state == "preempting" else KILL_GRACE_S)
            return reason
        if handle.wake.wait(0.1):
            handle.wake.clear()  # woken once; the next waits sleep again (a rank's grace period must not spin)


def _send(reporter: Reporter, lines: list[dict], handle: Handle) -> bool:
    try:
        answer = reporter.progress(lines)
    except Exception as exc:  # noqa: BLE001 - kept for the next report
        log.warning("Progress report for job %s failed (%s); will resend.", handle.job, exc)
        return False
    if answer.get("stop") or answer["http"] != 200:
        reason = answer.get("reason") or answer.get("detail") or "the web app said stop"
        handle.request_stop(reason, answer.get("state"))
    return True


def _status(outcome: str | None, exit_code: int, handle: Handle, payload: dict) -> tuple[str, str]:
    if outcome == "stopped":
        return "cancelled", f"Stopped: {handle.stop_reason}."
    if outcome == "interrupted":
        return "interrupted", "The worker shut down."
    if outcome == "walltime":
        return "failed", f"The job ran past its walltime of {payload.get('walltime_minutes')} min and was stopped."
    if exit_code == 0:
        return "succeeded", ""
    if exit_code < 0:
        return "failed", f"The runner was killed by signal {signal.Signals(-exit_code).name}."
    return "failed", f"The runner exited with status {exit_code}."


def artifact_files(payload: dict, config: NodeConfig, out_dir: Path, log_path: Path,
                   status: str) -> list[tuple[str, Path]]:
    """(name, path) of what to keep: what the runner wrote under its out dir (and a training job's trained
    weights, as safetensors) when it succeeded, its log when it failed."""
    if status != "succeeded":
        return [("runner.log", log_path)] if log_path.is_file() else []
    root = out_dir
    entries = list(out_dir.iterdir()) if out_dir.is_dir() else []
    if len(entries) == 1 and entries[0].is_dir():
        root = entries[0]  # a runner's own output folder (compression's --out): its files, without the prefix
    files = [(str(p.relative_to(root)).replace(os.sep, "."), p) for p in sorted(root.rglob("*")) if p.is_file()]
    if payload.get("kind") == "training" and payload.get("rank", 0) == 0:
        weights = final_weights(payload, config.work_dir)
        if weights is not None:
            files.append((f"model-{weights.parent.name}.safetensors", weights))
    return files


def _upload(reporter: Reporter, files: list[tuple[str, Path]], rank: int) -> None:
    for name, path in files:
        if rank:
            name = f"rank{rank}-{name}"
        try:
            answer = reporter.artifact(path, name[:200])
        except Exception as exc:  # noqa: BLE001 - a missing artifact must not lose the result
            log.warning("Upload of %s failed: %s", name, exc)
            continue
        if answer.get("detail"):
            log.warning("Artifact %s not kept: %s", name, answer["detail"])


def _report_result(reporter: Reporter, status: str, error: str, exit_code: int, runner: RunnerProcess,
                   where: str) -> dict:
    result = runner.final_result() if status == "succeeded" else None
    try:
        return reporter.result(status=status, result=result, error=json_safe(error), exit_code=exit_code,
                               stderr_tail=list(runner.stderr_tail))
    except Exception as exc:  # noqa: BLE001 - the reconciler notices the silent attempt and retries it
        log.error("Could not report the result of %s (%s); the reconciler will retry the attempt.", where, exc)
        return {"status": "unreported"}

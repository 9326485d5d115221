"""Start one process per GPU slot, torchrun-style, and make the attempt fail cleanly when any of them dies.

Without --node-rank every node of the topology is emulated on this host; with it only that node's
processes start (one launch per node, e.g. one Celery task per node, all given the same --master-addr
and --master-port).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 10.0  # after a rank failed, for the others to exit before they are killed
# After SIGTERM (the worker stopping the attempt), for the ranks to finish their step and, with
# checkpoints, save one (loop.py); the worker's own grace before SIGKILL bounds it too.
TERM_GRACE_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg, argv: list[str], module: str = "workers.training") -> int:
    topo = cfg.topology
    nodes = [cfg.node_rank] if cfg.node_rank is not None else list(range(len(topo.nodes)))
    if cfg.node_rank is not None and not cfg.master_port:
        print("error: a per-node launch needs --master-port (and --master-addr) shared by all nodes", file=sys.stderr)
        return 2
    port = cfg.master_port or free_port()
    procs: list[tuple[int, subprocess.Popen]] = []
    for node in nodes:
        for local in range(topo.procs_per_node):
            rank = node * topo.procs_per_node + local
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(topo.world_size),
                       LOCAL_WORLD_SIZE=str(topo.procs_per_node), GROUP_RANK=str(node),
                       MASTER_ADDR=cfg.master_addr, MASTER_PORT=str(port), HCOF_LAUNCHED="1")
            cmd = [sys.executable, "-m", module, *argv]
            procs.append((rank, subprocess.Popen(cmd, env=env)))  # noqa: S603 - our own module, argv as given

    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            if stopping["signal"] is not None:
                _stop(procs, TERM_GRACE_S)
                return 128 + stopping["signal"]
            codes = [(rank, p.poll()) for rank, p in procs]
            failed = [(rank, rc) for rank, rc in codes if rc not in (None, 0)]
            if failed:
                rank, rc = failed[0]
                _stop(procs)
                print(f"error: rank {rank} exited with status {rc}; stopped the other ranks", file=sys.stderr)
                return rc if rc > 0 else 1
            if all(rc == 0 for _, rc in codes):
                return 0
            time.sleep(0.1)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _stop(procs: list[tuple[int, subprocess.Popen]], grace: float = GRACE_S) -> None:
    for _, p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for _, p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

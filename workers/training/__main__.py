"""`python -m workers.training ...`: validate, then launch the processes (or, inside a launched
process — ours or torchrun's, recognised by RANK in the environment — train)."""
from __future__ import annotations

import os
import sys

from .cli import UsageError, fail, parse


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse(argv)
    except UsageError as exc:
        return fail(str(exc))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from .loop import run_worker

        return run_worker(cfg)
    from .launch import launch

    return launch(cfg, argv)


if __name__ == "__main__":
    sys.exit(main())

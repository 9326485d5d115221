"""`deepopt`: the command line for DeepOpt's REST API, for people who live in a terminal (sbatch, squeue,
scancel). Stand-alone: it needs Python 3.11+ and `requests`, not Django, so it runs on any laptop.

    python -m deepopt_cli login --server https://deepopt.example.org --username alice
    python -m deepopt_cli submit --team vision --kind compression --gpus 1 --spec '{"model": "minilm-l6"}'
    python -m deepopt_cli queue               # position, flow, GPUs, expected start and why each job waits
    python -m deepopt_cli show 42             # one job: state, attempts, and where it stands in the queue
    python -m deepopt_cli events 42 --follow  # its state changes and progress until it ends
    python -m deepopt_cli cancel 42 ; python -m deepopt_cli hold 42 ; python -m deepopt_cli release 42
    python -m deepopt_cli jobs --state queued ; python -m deepopt_cli nodes ; python -m deepopt_cli whoami
    python -m deepopt_cli upload model.safetensors --arch bert-base   # then spec.weights = the id it prints
    python -m deepopt_cli artifacts 42 ; python -m deepopt_cli download 42 -o out/   # checked by sha256
    python -m deepopt_cli usage               # your teams: GPUs now, GPU-hours this month, against quotas

The server and token come from --server / --token, else DEEPOPT_URL / DEEPOPT_TOKEN, else the file
`login` writes (`$DEEPOPT_CONFIG_DIR` or ~/.config/deepopt, `credentials.json`, mode 0600; it holds the
API token, never the password). `--json` prints the API's own JSON instead of a table.

Exit status: 0 done; 2 bad input (the API's 400 field messages on one line, a wrong password, a job that
does not exist or is not yours); 1 anything else (no server, no or a revoked token, a 409 such as
cancelling a finished job). Errors are one line on stderr.
"""
from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "failed", "cancelled"}
TIMEOUT_S = 30


class CliError(Exception):
    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# --- configuration ---------------------------------------------------------------------------------

def config_path() -> Path:
    base = os.environ.get("DEEPOPT_CONFIG_DIR") or Path.home() / ".config" / "deepopt"
    return Path(base) / "credentials.json"


def saved() -> dict:
    try:
        return json.loads(config_path().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {config_path()}: {exc}") from exc


def save(server: str, token: str, username: str) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Created 0600 before anything is written to it: the token is as good as the password.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"server": server, "token": token, "username": username}, f)
    os.chmod(path, 0o600)
    return path


# --- HTTP ------------------------------------------------------------------------------------------

def field_errors(body: Any, path: str = "") -> list[str]:
    """DRF's 400 body ({"name": ["msg"], "spec": {"model": ["msg"]}}) as ["name: msg", "spec.model: msg"]."""
    if isinstance(body, dict):
        return [e for key, value in body.items()
                for e in field_errors(value, f"{path}.{key}" if path else str(key))]
    if isinstance(body, list) and not all(isinstance(item, (str, int, float)) for item in body):
        return [e for i, item in enumerate(body) for e in field_errors(item, f"{path}.{i}" if path else str(i))]
    messages = body if isinstance(body, list) else [body]
    bare = path in ("", "detail", "non_field_errors")
    return [str(m) if bare else f"{path}: {m}" for m in messages]


class Api:
    def __init__(self, server: str, token: str | None):
        self.server = server.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Accept"] = "application/json"
        if token:
            self.session.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, **kwargs) -> Any:
        url = f"{self.server}/api/v1/{path.lstrip('/')}"
        try:
            response = self.session.request(method, url, timeout=TIMEOUT_S, **kwargs)
        except requests.RequestException as exc:
            raise CliError(f"cannot reach {self.server}: {type(exc).__name__}") from exc
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = None
        if response.status_code < 400:
            return body
        if response.status_code == 400:
            raise CliError("; ".join(field_errors(body)) or "the server refused the request (400)", 2)
        detail = body.get("detail") if isinstance(body, dict) else None
        if response.status_code == 401:
            raise CliError(f"not signed in to {self.server} ({detail or 'HTTP 401'}): run `deepopt login`")
        if response.status_code == 404:
            raise CliError(f"not found: {path.strip('/')} (it does not exist, or it is not yours to see)", 2)
        raise CliError(detail or f"HTTP {response.status_code} from {url}")

    def get_url(self, url: str) -> Any:
        try:
            response = self.session.get(url, timeout=TIMEOUT_S)
            response.raise_for_status()
            return response.json()
        except (requests.RequestException, ValueError) as exc:
            raise CliError(f"cannot read {url}: {type(exc).__name__}") from exc

    def download(self, url: str, target: Path, sha256: str) -> int:
        """Stream a file to `target` through a temporary file beside it, checked against the listed sha256:
        `target` appears whole and verified, or not at all. Returns the bytes written."""
        part = target.with_name(f".{target.name}.part")
        digest, size = hashlib.sha256(), 0
        try:
            with self.session.get(url, timeout=TIMEOUT_S, stream=True,
                                  headers={"Accept": "application/octet-stream"}) as response:
                if response.status_code >= 400:
                    try:
                        detail = response.json().get("detail")
                    except (ValueError, AttributeError):
                        detail = None
                    raise CliError(detail or f"HTTP {response.status_code} from {url}",
                                   2 if response.status_code == 404 else 1)
                with part.open("wb") as fh:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        fh.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
            if digest.hexdigest() != sha256:
                raise CliError(f"{target.name}: the download's sha256 does not match the server's; nothing kept")
            os.replace(part, target)
            return size
        except requests.RequestException as exc:
            raise CliError(f"cannot download {url}: {type(exc).__name__}") from exc
        finally:
            part.unlink(missing_ok=True)

    def pages(self, path: str, params: dict | None = None, limit: int | None = None) -> list[dict]:
        """Every result of a paginated list (following `next`), or the first `limit`."""
        out: list[dict] = []
        body = self.call("GET", path, params=params)
        while True:
            out += body["results"]
            if not body.get("next") or (limit is not None and len(out) >= limit):
                return out[:limit] if limit is not None else out
            body = self.get_url(body["next"])

    def tail(self, path: str, start: str | None) -> tuple[list[dict], str]:
        """An append-only list from the page at `start` (a URL; None: the first page) to its end, and the
        URL of its last page, where the next call resumes: a long history is read once, not per poll."""
        body = self.get_url(start) if start else self.call("GET", path, params={"page_size": 200})
        page_url = start or f"{self.server}/api/v1/{path.lstrip('/')}?page_size=200"
        out = list(body["results"])
        while body.get("next"):
            page_url = body["next"]
            body = self.get_url(page_url)
            out += body["results"]
        return out, page_url


# --- output ----------------------------------------------------------------------------------------

def when(value: str | None, now: datetime | None = None) -> str:
    """An ISO time as local 'YYYY-MM-DD HH:MM', with 'in 5m' / '3h ago' beside it."""
    if not value:
        return "-"
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    now = now or datetime.now(UTC)
    delta = (at - now).total_seconds()
    span = abs(delta)
    rel = (f"{span:.0f}s" if span < 90 else f"{span / 60:.0f}m" if span < 5400 else
           f"{span / 3600:.1f}h" if span < 172800 else f"{span / 86400:.1f}d")
    return f"{at.astimezone().strftime('%Y-%m-%d %H:%M')} ({'in ' + rel if delta > 0 else rel + ' ago'})"


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    # The last column (a reason, a message) is left unpadded so that long text does not widen the rest.
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)) + "  " + row[-1]
                     for row in cells)


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1) if args.json else text)


# --- commands --------------------------------------------------------------------------------------

def cmd_login(args: argparse.Namespace) -> int:
    username = args.username or input("Username: ")
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("Password: ")
    body = Api(args.server, None).call("POST", "auth/token/", json={"username": username, "password": password})
    token = body["token"]
    me = Api(args.server, token).call("GET", "me/")
    path = save(args.server, token, me["username"])
    teams = ", ".join(t["slug"] for t in me.get("teams", [])) or "no team yet"
    print(f"Signed in to {args.server} as {me['username']} ({teams}); token saved in {path}")
    return 0


def cmd_whoami(args: argparse.Namespace, api: Api) -> int:
    me = api.call("GET", "me/")
    teams = ", ".join(f"{t['slug']} ({t['role']})" for t in me.get("teams", [])) or "no team"
    emit(args, me, f"{me['username']} on {api.server}{' (staff)' if me.get('is_staff') else ''}: {teams}")
    return 0


def load_spec(value: str) -> Any:
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"--spec is not JSON: {exc}", 2) from exc


def cmd_submit(args: argparse.Namespace, api: Api) -> int:
    if args.file:
        job = load_spec("@" + args.file)
        if not isinstance(job, dict):
            raise CliError(f"{args.file}: a job is a JSON object", 2)
    else:
        job = {}
    for key, value in (("name", args.name), ("team", args.team), ("kind", args.kind),
                       ("priority", args.priority), ("walltime_minutes", args.walltime)):
        if value is not None:
            job[key] = value
    if args.gpus is not None or args.nodes is not None or args.gpu_memory_gb is not None:
        resources = job.setdefault("resources", {})
        for key, value in (("gpus", args.gpus), ("nodes", args.nodes), ("gpu_memory_gb", args.gpu_memory_gb)):
            if value is not None:
                resources[key] = value
    if args.spec is not None:
        job["spec"] = load_spec(args.spec)
    if args.after:
        job["depends_on"] = args.after
    job.setdefault("name", f"{job.get('kind', 'job')} from the command line")
    created = api.call("POST", "jobs/", json=job)
    emit(args, created, f"Submitted job {created['id']} ({created['name']}): {created['state']}"
         + (f" - {created['pending_reason']}" if created.get("pending_reason") else ""))
    if not args.wait:
        return 0
    # Like `sbatch --wait`: follow the job to its end; the exit status says how it ended.
    state = follow(api, created["id"], True, args.interval, args.json)
    if state != "succeeded":
        raise CliError(f"job {created['id']} ended {state}")
    return 0


def cmd_jobs(args: argparse.Namespace, api: Api) -> int:
    user = api.call("GET", "me/")["username"] if args.mine else args.user  # whoever the token belongs to
    params = {k: v for k, v in (("state", args.state), ("kind", args.kind), ("team", args.team),
                                ("priority", args.priority), ("submitter", user)) if v}
    jobs = api.pages("jobs/", params, limit=args.limit)
    rows = [[j["id"], j["team_name"], j["kind"], j["state"], j["resources"]["gpus"], when(j["submitted_at"]),
             j["name"]] for j in jobs]
    emit(args, jobs, table(rows, ["ID", "TEAM", "KIND", "STATE", "GPUS", "SUBMITTED", "NAME"]))
    return 0


def cmd_queue(args: argparse.Namespace, api: Api) -> int:
    entries = api.pages("queue/", limit=args.limit)
    rows = [[e["position"], e["job"]["id"], e["flow"], e["job"]["gpus"], e["job"]["nodes"],
             when(e.get("eta")) if e.get("eta") else "-", e["reason"] or "next to start"] for e in entries]
    text = table(rows, ["POS", "JOB", "FLOW", "GPUS", "NODES", "EXPECTED START", "REASON"]) if rows else \
        "The queue is empty."
    emit(args, entries, text)
    return 0


def cmd_show(args: argparse.Namespace, api: Api) -> int:
    job = api.call("GET", f"jobs/{args.job}/")
    res = job["resources"]
    lines = [
        f"Job {job['id']}: {job['name']}",
        f"  state       {job['state']}" + (f" (attempt {job['attempt']}, {job['max_attempts']} allowed"
                                           + (f"; {job['preemptions']} preemption(s)" if job['preemptions'] else "")
                                           + ")" if job["attempt"] > 1 else ""),
        f"  team        {job['team_name']}   kind {job['kind']}   priority {job['priority']}"
        f"   submitted by {job['submitter']}",
        f"  resources   {res['gpus']} GPU(s) on {res['nodes']} node(s)"
        + (f", {res['gpu_memory_gb']} GB each" if res.get("gpu_memory_gb") else "")
        + (f", walltime {job['walltime_minutes']} min" if job.get("walltime_minutes") else ""),
        f"  submitted   {when(job['submitted_at'])}",
    ]
    if job.get("depends_on"):
        lines.append("  after       " + ", ".join(f"{d['id']} {d['name']} ({d['state']})" for d in job["depends_on"]))
    if job.get("started_at"):
        lines.append(f"  started     {when(job['started_at'])}")
    if job.get("finished_at"):
        lines.append(f"  finished    {when(job['finished_at'])}")
    queue = job.get("queue")
    if queue and job["state"] == "queued":
        lines.append(f"  queue       #{queue['position']} in {queue['flow']}: {queue['reason'] or 'next to start'}")
        if queue.get("eta"):
            lines.append(f"  expected    {when(queue['eta'])}")
    if job.get("error"):
        lines.append(f"  error       {job['error'].splitlines()[0]}")
    emit(args, job, "\n".join(lines))
    return 0


def event_line(e: dict) -> str:
    stamp = datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    change = f"{e['from_state'] or '-'} -> {e['to_state']}  " if e.get("to_state") else ""
    return f"{stamp}  {change}{e['message']}"


def follow(api: Api, job_id: int, follow_on: bool, interval: float, as_json: bool) -> str | None:
    """Print the job's events (with `follow_on`, until it ends); returns its final state when followed."""
    seen: set[int] = set()
    page: str | None = None
    while True:
        events, page = api.tail(f"jobs/{job_id}/events/", page)
        fresh = [e for e in events if e["id"] not in seen]
        seen |= {e["id"] for e in fresh}
        for e in fresh:
            print(json.dumps(e) if as_json else event_line(e), flush=True)
        if not follow_on:
            return None
        state = api.call("GET", f"jobs/{job_id}/")["state"]
        if state in TERMINAL and not fresh:
            return state
        time.sleep(interval)


def cmd_events(args: argparse.Namespace, api: Api) -> int:
    follow(api, args.job, args.follow, args.interval, args.json)
    return 0


def each_job(args: argparse.Namespace, api: Api, verb: str, text) -> int:  # noqa: ANN001
    """POST jobs/{id}/{verb}/ for every id given; one line per job, errors per job on stderr."""
    status = 0
    for job_id in args.jobs:
        try:
            job = api.call("POST", f"jobs/{job_id}/{verb}/")
        except CliError as exc:
            print(f"deepopt: job {job_id}: {exc}", file=sys.stderr)
            status = max(status, exc.status)
            continue
        emit(args, job, text(job))
    return status


def cmd_cancel(args: argparse.Namespace, api: Api) -> int:
    return each_job(args, api, "cancel", lambda job: f"Job {job['id']} ({job['name']}): {job['state']}")


def cmd_hold(args: argparse.Namespace, api: Api) -> int:
    return each_job(args, api, "hold", lambda job: f"Job {job['id']} ({job['name']}): held by {job['held_by']}")


def cmd_release(args: argparse.Namespace, api: Api) -> int:
    return each_job(args, api, "release", lambda job: f"Job {job['id']} ({job['name']}): released")


def cmd_nodes(args: argparse.Namespace, api: Api) -> int:
    nodes = api.pages("nodes/")
    rows = [[n["name"], n["team_name"], n["rack"], n["state"],
             f"{sum(g['busy'] for g in n['gpus'])}/{len(n['gpus'])}",
             when(n["last_heartbeat_at"]) if n.get("last_heartbeat_at") else "never",
             ", ".join(sorted({g["model"] for g in n["gpus"]}))] for n in nodes]
    emit(args, nodes, table(rows, ["NODE", "TEAM", "RACK", "STATE", "BUSY", "HEARTBEAT", "GPU"]))
    return 0


def size_text(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def cmd_artifacts(args: argparse.Namespace, api: Api) -> int:
    items = api.pages(f"jobs/{args.job}/artifacts/")
    rows = [[a["id"], a["attempt"], size_text(a["size"]), a["sha256"][:12], when(a["created_at"]), a["name"]]
            for a in items]
    emit(args, items, table(rows, ["ID", "ATTEMPT", "SIZE", "SHA256", "CREATED", "NAME"]) if rows else
         f"Job {args.job} has no artifacts yet.")
    return 0


def cmd_download(args: argparse.Namespace, api: Api) -> int:
    items = api.pages(f"jobs/{args.job}/artifacts/")
    if args.artifacts:
        chosen = []
        for wanted in args.artifacts:
            # By id, or by name from the newest attempt that has it (the list is newest attempt first).
            match = next((a for a in items if str(a["id"]) == wanted or a["name"] == wanted), None)
            if match is None:
                raise CliError(f"job {args.job} has no artifact {wanted!r} (see `deepopt artifacts {args.job}`)", 2)
            chosen.append(match)
    else:
        newest = max((a["attempt"] for a in items), default=None)
        chosen = [a for a in items if a["attempt"] == newest]
        if not chosen:
            raise CliError(f"job {args.job} has no artifacts yet", 2)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out_dir / Path(a["name"]).name for a in chosen]
    if len(set(targets)) < len(targets):  # the same name from two attempts: one would overwrite the other
        raise CliError("two of those artifacts have the same name; download them one at a time with -o", 2)
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.force:
        raise CliError(f"{', '.join(existing)} already exist(s); --force replaces", 2)
    done = []
    for a, target in zip(chosen, targets, strict=True):
        size = api.download(a["download_url"], target, a["sha256"])
        done.append({"artifact": a["id"], "name": a["name"], "path": str(target), "size": size, "sha256": a["sha256"]})
        if not args.json:
            print(f"{target}  {size_text(size)}  sha256 {a['sha256'][:12]} verified", flush=True)
    if args.json:
        print(json.dumps(done, indent=1))
    return 0


def cmd_usage(args: argparse.Namespace, api: Api) -> int:
    usage = api.pages("usage/")
    rows = [[u["slug"], u["weight"], f"{u['gpus_in_use']}/{u['max_gpus']}",
             f"{u['gpu_hours_this_month']:.1f}/{u['gpu_hours_per_month']:g}",
             f"{100 * u['gpu_hours_this_month'] / u['gpu_hours_per_month']:.0f}%" if u["gpu_hours_per_month"] else "-",
             u["queued_jobs"], u["running_jobs"], u["team_name"]] for u in usage]
    emit(args, usage, table(rows, ["TEAM", "WEIGHT", "GPUS", "GPU-HOURS (MONTH)", "USED", "QUEUED", "RUNNING",
                                   "NAME"]) if rows else "No teams.")
    return 0


def cmd_models(args: argparse.Namespace, api: Api) -> int:
    models = api.pages("models/")
    rows = [[m["id"], m["team_name"], m["arch"], size_text(m["size"]), m["tensors"], when(m["created_at"]), m["name"]]
            for m in models]
    emit(args, models, table(rows, ["ID", "TEAM", "ARCH", "SIZE", "TENSORS", "UPLOADED", "NAME"]) if rows else
         "No uploaded models.")
    return 0


def cmd_upload(args: argparse.Namespace, api: Api) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path}: no such file", 2)
    data = {k: v for k, v in (("arch", args.arch), ("team", args.team), ("name", args.name)) if v}
    with path.open("rb") as fh:
        created = api.call("POST", "models/", data=data, files={"file": (path.name, fh, "application/octet-stream")})
    emit(args, created, f"Uploaded model {created['id']} ({created['name']}: {created['arch']}, "
         f"{size_text(created['size'])}, {created['tensors']} tensors); a compression job uses it with "
         f'"spec": {{"model": "{created["arch"]}", "weights": {created["id"]}}}')
    return 0


def job_ids(text: str) -> list[int]:
    return [positive_int(part) for part in text.replace(",", " ").split()]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepopt", description="DeepOpt from the command line.")
    p.add_argument("--server", help=f"DeepOpt's address (DEEPOPT_URL; default: the saved one, or {DEFAULT_SERVER})")
    p.add_argument("--token", help="an API token (DEEPOPT_TOKEN; default: the one `login` saved)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("login", help="get an API token and save it")
    s.add_argument("--username")
    s.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    sub.add_parser("whoami", help="who the token belongs to, and their teams")

    s = sub.add_parser("submit", help="submit a job (like sbatch)")
    s.add_argument("-f", "--file", help="the job as JSON (the body of POST /api/v1/jobs/); flags override it")
    s.add_argument("--name")
    s.add_argument("--team", help="team id or slug")
    s.add_argument("--kind", choices=["compression", "training"])
    s.add_argument("--priority", choices=["low", "normal", "high", "urgent"])
    s.add_argument("--gpus", type=positive_int)
    s.add_argument("--nodes", type=positive_int)
    s.add_argument("--gpu-memory-gb", type=float)
    s.add_argument("--walltime", type=positive_int, metavar="MINUTES")
    s.add_argument("--spec", help="the job's spec as JSON, or @FILE")
    s.add_argument("--after", type=job_ids, metavar="ID[,ID...]",
                   help="start only once these jobs of the team have succeeded (like --dependency=afterok)")
    s.add_argument("--wait", action="store_true",
                   help="print the job's events until it ends; exit 0 only if it succeeded (like sbatch --wait)")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between polls with --wait")

    s = sub.add_parser("jobs", help="jobs you can see, newest first")
    s.add_argument("--state")
    s.add_argument("--kind")
    s.add_argument("--team")
    s.add_argument("--priority")
    who = s.add_mutually_exclusive_group()
    who.add_argument("--user", help="only this user's jobs (like squeue -u)")
    who.add_argument("--mine", action="store_true", help="only your own jobs")
    s.add_argument("--limit", type=positive_int, default=50)

    s = sub.add_parser("queue", help="the queue in the scheduler's order, with reasons and expected starts")
    s.add_argument("--limit", type=positive_int)

    s = sub.add_parser("show", help="one job")
    s.add_argument("job", type=positive_int)

    s = sub.add_parser("events", help="a job's state changes, notes and progress")
    s.add_argument("job", type=positive_int)
    s.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between polls with --follow")

    s = sub.add_parser("cancel", help="cancel jobs (like scancel)")
    s.add_argument("jobs", type=positive_int, nargs="+")
    s = sub.add_parser("hold", help="keep queued jobs from starting until released (like scontrol hold)")
    s.add_argument("jobs", type=positive_int, nargs="+")
    s = sub.add_parser("release", help="let held jobs start again (like scontrol release)")
    s.add_argument("jobs", type=positive_int, nargs="+")

    sub.add_parser("nodes", help="nodes you can see")

    s = sub.add_parser("artifacts", help="the files a job's attempts produced")
    s.add_argument("job", type=positive_int)
    s = sub.add_parser("download", help="download a job's artifacts (default: all of its newest attempt)")
    s.add_argument("job", type=positive_int)
    s.add_argument("artifacts", nargs="*", metavar="ID|NAME", help="which ones (default: the newest attempt's)")
    s.add_argument("-o", "--output", default=".", help="the folder to write to (default: here)")
    s.add_argument("--force", action="store_true", help="replace files that exist")

    sub.add_parser("usage", help="your teams against their quotas: GPUs now, GPU-hours this month (like sshare)")
    sub.add_parser("models", help="your teams' uploaded model weights")
    s = sub.add_parser("upload", help="upload model weights (safetensors) for compression jobs")
    s.add_argument("file")
    s.add_argument("--arch", required=True, help="the catalog architecture of the weights, e.g. bert-base")
    s.add_argument("--team", help="team id or slug (optional when you are in one team)")
    s.add_argument("--name")
    return p


COMMANDS = {"whoami": cmd_whoami, "submit": cmd_submit, "jobs": cmd_jobs, "queue": cmd_queue, "show": cmd_show,
            "events": cmd_events, "cancel": cmd_cancel, "nodes": cmd_nodes, "artifacts": cmd_artifacts,
            "download": cmd_download, "models": cmd_models, "upload": cmd_upload, "usage": cmd_usage,
            "hold": cmd_hold, "release": cmd_release}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        stored = saved()
        args.server = (args.server or os.environ.get("DEEPOPT_URL") or stored.get("server") or DEFAULT_SERVER)
        if args.command == "login":
            return cmd_login(args)
        token = args.token or os.environ.get("DEEPOPT_TOKEN") or (
            stored.get("token") if stored.get("server", "").rstrip("/") == args.server.rstrip("/") else None)
        if not token:
            raise CliError(f"no token for {args.server}: run `deepopt login` or set DEEPOPT_TOKEN")
        return COMMANDS[args.command](args, Api(args.server, token))
    except CliError as exc:
        print(f"deepopt: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130

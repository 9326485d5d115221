"""The `deepopt` command line against a real server (pytest-django's live server, real HTTP)."""
from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from apps.scheduling.live import run_pass
from apps.scheduling.models import Job
from deepopt_cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120), pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parents[2]
SPEC = '{"model": "minilm-l6", "quantization": {"mode": "auto", "max_quality_drop": 0.01}}'


@pytest.fixture
def cli(live_server, tmp_path, monkeypatch, capsys):
    """cli(*argv) -> (exit status, stdout, stderr), as the user whose token is in the saved credentials."""
    monkeypatch.setenv("DEEPOPT_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("DEEPOPT_URL", live_server.url)
    monkeypatch.delenv("DEEPOPT_TOKEN", raising=False)

    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        status = main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return run


def login(cli, username: str, password: str) -> None:
    status, out, err = cli("login", "--username", username, "--password-stdin", stdin=password + "\n")
    assert status == 0, err
    assert f"as {username}" in out


def test_login_saves_a_token_only_its_owner_can_read_and_never_the_password(cli, alice, team_a, tmp_path):
    status, _, err = cli("login", "--username", "alice", "--password-stdin", stdin="wrong-password\n")
    assert status == 2
    assert "Unable to log in" in err
    assert err.count("\n") == 1
    assert err.startswith("deepopt: ")
    assert not (tmp_path / "cfg" / "credentials.json").exists()

    login(cli, "alice", "alice-pass-123")
    path = tmp_path / "cfg" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = json.loads(path.read_text())
    assert saved["username"] == "alice"
    assert len(saved["token"]) >= 20
    assert "alice-pass-123" not in path.read_text()
    status, out, _ = cli("whoami")
    assert status == 0
    assert out.strip().endswith(f"{team_a.slug} (lead)")


def test_submit_queue_show_events_and_cancel_through_the_api(cli, alice, team_a, node_a):
    login(cli, "alice", "alice-pass-123")
    status, out, err = cli("submit", "--team", team_a.slug, "--kind", "compression", "--gpus", "16",
                           "--name", "too big", "--spec", SPEC)
    # 16 GPUs is over the team's max_gpus_per_job (8): the API's 400, on one line, and nothing is written.
    assert status == 2
    assert out == ""
    assert err.startswith("deepopt: "), err
    assert err.count("\n") == 1, err
    assert "8" in err, err
    assert not Job.objects.exists()

    status, out, err = cli("submit", "--team", team_a.slug, "--kind", "compression", "--gpus", "8",
                           "--name", "whole node", "--spec", SPEC)
    assert status == 0, err
    first = Job.objects.get(name="whole node")
    assert out.startswith(f"Submitted job {first.pk} (whole node)")
    assert (first.kind, first.resources["gpus"], first.spec["model"], first.submitter.username) == (
        "compression", 8, "minilm-l6", "alice")
    status, _, err = cli("submit", "--team", team_a.slug, "--kind", "compression", "--gpus", "1",
                         "--name", "waits", "--spec", SPEC)
    assert status == 0, err
    second = Job.objects.get(name="waits")
    run_pass()  # the node's 8 GPUs go to the first job; the second waits, and says why

    status, out, _ = cli("queue")
    assert status == 0
    header, row = out.strip().splitlines()
    assert header.split()[:4] == ["POS", "JOB", "FLOW", "GPUS"]
    assert row.split()[:2] == ["1", str(second.pk)]
    assert row.endswith(f"team {team_a.name} is at 8/8 GPUs")  # the scheduler's reason, as the API gives it
    assert re.search(r"\(in (29|30)m\)", row), row  # expected start: the first job's 30-min walltime is up

    status, out, _ = cli("jobs")
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:]] == [str(second.pk), str(first.pk)]  # newest first
    status, out, _ = cli("--json", "jobs", "--state", "allocated")
    assert [j["id"] for j in json.loads(out)] == [first.pk]

    status, out, _ = cli("show", str(second.pk))
    assert status == 0
    assert "state       queued" in out
    assert f"#1 in {team_a.name}/compression" in out

    status, out, _ = cli("cancel", str(second.pk))
    assert status == 0
    assert out.strip() == f"Job {second.pk} (waits): cancelled"
    status, _, err = cli("cancel", str(second.pk))
    assert status == 1
    assert "cannot become cancelled" in err
    # A finished job's --follow ends by itself, after printing its whole history.
    status, out, _ = cli("events", str(second.pk), "--follow", "--interval", "0.1")
    assert status == 0
    assert [line.split("  ")[1] for line in out.strip().splitlines()] == ["- -> queued", "queued -> cancelled"]


def test_another_team_sees_none_of_it_and_bad_input_is_one_line(cli, alice, charlie, team_a, node_a):
    login(cli, "alice", "alice-pass-123")
    assert cli("submit", "--team", team_a.slug, "--kind", "compression", "--gpus", "1", "--spec", SPEC)[0] == 0
    job = Job.objects.get()
    run_pass()

    login(cli, "charlie", "charlie-pass-123")
    status, out, _ = cli("jobs")
    assert status == 0
    assert out.strip().splitlines()[1:] == []
    assert cli("queue")[1].strip() == "The queue is empty."
    assert "a-node-1" not in cli("nodes")[1]
    for argv in (("show", str(job.pk)), ("events", str(job.pk)), ("cancel", str(job.pk))):
        status, out, err = cli(*argv)
        assert (status, out, err.count("\n")) == (2, "", 1), argv
    job.refresh_from_db()
    assert job.state != "cancelled"
    status, _, err = cli("submit", "--team", team_a.slug, "--kind", "compression", "--spec", SPEC)
    assert status == 2
    assert err.startswith("deepopt: team: ")
    status, _, err = cli("submit", "--kind", "compression", "--spec", "{not json")
    assert status == 2
    assert "--spec is not JSON" in err
    with pytest.raises(SystemExit) as exit_:
        cli("show", "zero")
    assert exit_.value.code == 2  # argparse's own usage error


def test_no_server_or_no_token_is_one_line_and_status_1(cli, monkeypatch):
    status, _, err = cli("whoami")
    assert status == 1
    assert "run `deepopt login`" in err
    assert err.count("\n") == 1
    status, _, err = cli("--server", "http://127.0.0.1:9", "--token", "x", "queue")
    assert status == 1
    assert err.startswith("deepopt: cannot reach http://127.0.0.1:9")
    assert err.count("\n") == 1


def test_the_module_runs_as_a_program_and_prints_json(live_server, alice, team_a, tmp_path):
    from rest_framework.authtoken.models import Token

    token, _ = Token.objects.get_or_create(user=alice)
    env = dict(os.environ, DEEPOPT_URL=live_server.url, DEEPOPT_TOKEN=token.key,
               DEEPOPT_CONFIG_DIR=str(tmp_path / "cfg"))
    done = subprocess.run([sys.executable, "-m", "deepopt_cli", "--json", "whoami"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["username"] == "alice"


def test_events_reads_a_long_history_once_in_order(cli, alice, team_a, node_a):
    from apps.scheduling.models import JobEvent

    login(cli, "alice", "alice-pass-123")
    assert cli("submit", "--team", team_a.slug, "--kind", "compression", "--gpus", "1", "--spec", SPEC)[0] == 0
    job = Job.objects.get()
    JobEvent.objects.bulk_create([JobEvent(job=job, kind=JobEvent.Kind.PROGRESS, message=f"step {i}")
                                  for i in range(450)])  # three pages of 200
    status, out, _ = cli("events", str(job.pk))
    assert status == 0
    messages = [line.split("  ", 1)[1] for line in out.strip().splitlines()]
    assert messages == ["- -> queued  Submitted.", *(f"step {i}" for i in range(450))]


def test_submit_after_another_job_and_show_what_it_waits_for(cli, alice, team_a, node_a):
    login(cli, "alice", "alice-pass-123")
    assert cli("submit", "--team", team_a.slug, "--kind", "compression", "--name", "train", "--spec", SPEC)[0] == 0
    first = Job.objects.get()
    status, _, err = cli("submit", "--team", team_a.slug, "--kind", "compression", "--name", "compress",
                         "--after", str(first.pk), "--spec", SPEC)
    assert status == 0, err
    second = Job.objects.get(name="compress")
    assert list(second.depends_on.all()) == [first]
    run_pass()
    status, out, _ = cli("show", str(second.pk))
    assert f"  after       {first.pk} train (allocated)" in out
    assert f"Waits for job {first.pk} (allocated) to succeed." in out
    status, _, err = cli("submit", "--team", team_a.slug, "--kind", "compression", "--after", "424242",
                         "--spec", SPEC)
    assert status == 2
    assert err.strip() == "deepopt: depends_on: No job 424242 that you can see."


def test_upload_weights_then_list_them_and_a_pickle_is_refused(cli, alice, charlie, team_a, settings, tmp_path):
    import torch
    from safetensors.torch import save_file

    settings.MEDIA_ROOT = tmp_path / "media"
    weights = tmp_path / "tuned.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(weights))
    login(cli, "alice", "alice-pass-123")
    status, out, err = cli("upload", str(weights), "--arch", "bert-base", "--team", team_a.slug)
    assert status == 0, err
    model_id = int(re.search(r"Uploaded model (\d+)", out).group(1))
    assert f'"weights": {model_id}' in out  # how a compression job names it
    status, out, _ = cli("models")
    assert status == 0
    assert "tuned.safetensors" in out
    assert "bert-base" in out

    pickled = tmp_path / "tuned.pt"
    torch.save({"w": torch.zeros(4, 4)}, pickled)
    status, out, err = cli("upload", str(pickled), "--arch", "bert-base", "--team", team_a.slug)
    assert (status, out, err.count("\n")) == (2, "", 1)
    assert err.startswith("deepopt: file: ")
    status, _, err = cli("upload", str(tmp_path / "missing.safetensors"), "--arch", "bert-base")
    assert status == 2
    assert "no such file" in err

    login(cli, "charlie", "charlie-pass-123")
    assert cli("models")[1].strip() == "No uploaded models."


def test_artifacts_are_listed_and_downloaded_whole_and_verified(cli, alice, charlie, team_a, node_a, settings,
                                                                 tmp_path):
    import hashlib

    from django.core.files.base import ContentFile

    from apps.scheduling.models import JobArtifact

    settings.MEDIA_ROOT = tmp_path / "media"
    login(cli, "alice", "alice-pass-123")
    assert cli("submit", "--team", team_a.slug, "--kind", "compression", "--gpus", "1", "--spec", SPEC)[0] == 0
    job = Job.objects.get()
    status, out, _ = cli("artifacts", str(job.pk))
    assert (status, out.strip()) == (0, f"Job {job.pk} has no artifacts yet.")
    assert cli("download", str(job.pk), "-o", str(tmp_path / "none"))[0] == 2

    files = {1: {"report.json": b'{"attempt": 1}'},
             2: {"report.json": b'{"attempt": 2}', "model.safetensors": b"x" * 5000}}
    for attempt, named in files.items():
        for name, content in named.items():
            artifact = JobArtifact(job=job, attempt=attempt, name=name, size=len(content),
                                   sha256=hashlib.sha256(content).hexdigest())
            artifact.file.save(name, ContentFile(content), save=True)
    status, out, _ = cli("artifacts", str(job.pk))
    assert status == 0
    assert [line.split()[1] for line in out.strip().splitlines()[1:]] == ["2", "2", "1"]  # newest attempt first

    out_dir = tmp_path / "out"
    status, out, err = cli("download", str(job.pk), "-o", str(out_dir))  # the newest attempt's files
    assert status == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors", "report.json"]
    assert (out_dir / "report.json").read_bytes() == b'{"attempt": 2}'
    assert out.count("verified") == 2
    status, _, err = cli("download", str(job.pk), "-o", str(out_dir))
    assert status == 2
    assert "--force" in err  # nothing is overwritten unasked
    first = JobArtifact.objects.get(job=job, attempt=1)
    status, _, err = cli("download", str(job.pk), str(first.pk), "-o", str(out_dir), "--force")
    assert status == 0, err
    assert (out_dir / "report.json").read_bytes() == b'{"attempt": 1}'
    assert cli("download", str(job.pk), "nope.bin", "-o", str(out_dir))[0] == 2
    second = JobArtifact.objects.get(job=job, attempt=2, name="report.json")
    status, _, err = cli("download", str(job.pk), str(first.pk), str(second.pk), "-o", str(tmp_path / "both"))
    assert status == 2
    assert "same name" in err

    # A file that does not match the server's checksum is not kept, and what was there stays.
    JobArtifact.objects.filter(pk=first.pk).update(sha256="0" * 64)
    status, _, err = cli("download", str(job.pk), str(first.pk), "-o", str(tmp_path / "bad"))
    assert status == 1
    assert "sha256 does not match" in err
    assert list((tmp_path / "bad").iterdir()) == []

    login(cli, "charlie", "charlie-pass-123")
    for argv in (("artifacts", str(job.pk)), ("download", str(job.pk), "-o", str(tmp_path / "c"))):
        status, out, err = cli(*argv)
        assert (status, out, err.count("\n")) == (2, "", 1), argv


def test_submit_wait_follows_the_job_to_its_end_and_the_exit_status_says_how_it_ended(cli, alice, team_a, node_a):
    import threading
    import time as time_

    from django.db import connection

    from apps.scheduling.services import cancel_job

    login(cli, "alice", "alice-pass-123")

    def cancel_when_submitted() -> None:
        try:
            for _ in range(200):
                job = Job.objects.filter(name="to wait for").first()
                if job is not None:
                    time_.sleep(0.3)  # let the command print the submission and start following
                    cancel_job(job, actor=alice)
                    return
                time_.sleep(0.05)
        finally:
            connection.close()

    canceller = threading.Thread(target=cancel_when_submitted)
    canceller.start()
    status, out, err = cli("submit", "--team", team_a.slug, "--kind", "compression", "--name", "to wait for",
                           "--spec", SPEC, "--wait", "--interval", "0.1")
    canceller.join(timeout=30)
    assert status == 1
    assert err.strip().endswith("ended cancelled")
    lines = out.strip().splitlines()
    assert lines[0].startswith("Submitted job ")
    assert "queued -> cancelled" in lines[-1]  # it followed the job to its last state change, then stopped
    assert any("- -> queued" in line for line in lines[1:])


def test_usage_shows_your_teams_against_their_quotas(cli, alice, charlie, team_a, team_b):
    login(cli, "alice", "alice-pass-123")
    status, out, _ = cli("usage")
    assert status == 0
    header, row = out.strip().splitlines()
    assert header.split()[:3] == ["TEAM", "WEIGHT", "GPUS"]
    assert row.split()[:4] == [team_a.slug, "2.0", f"0/{team_a.max_gpus}", f"0.0/{team_a.gpu_hours_per_month:g}"]
    assert team_b.slug not in out
    status, out, _ = cli("--json", "usage")
    assert [u["team"] for u in json.loads(out)] == [team_a.pk]


def test_hold_keeps_a_queued_job_back_and_release_lets_it_start(cli, alice, team_a, node_a):
    login(cli, "alice", "alice-pass-123")
    assert cli("submit", "--team", team_a.slug, "--kind", "compression", "--name", "later", "--spec", SPEC)[0] == 0
    job = Job.objects.get()
    status, out, _ = cli("hold", str(job.pk))
    assert (status, out.strip()) == (0, f"Job {job.pk} (later): held by alice")
    assert run_pass().placed == []
    status, out, _ = cli("queue")
    assert out.strip().splitlines()[1].endswith("Held by alice: it starts only once released.")
    status, out, _ = cli("release", str(job.pk))
    assert (status, out.strip()) == (0, f"Job {job.pk} (later): released")
    assert run_pass().placed == [job.pk]
    status, _, err = cli("hold", str(job.pk))  # it left the queue: the API's 409, on one line
    assert status == 1
    assert err.strip() == f"deepopt: job {job.pk}: An allocated job cannot become held."


def test_jobs_of_one_user_like_squeue_u(cli, alice, bob, team_a, node_a):
    login(cli, "bob", "bob-pass-123")
    assert cli("submit", "--team", team_a.slug, "--kind", "compression", "--name", "bobs", "--spec", SPEC)[0] == 0
    login(cli, "alice", "alice-pass-123")
    assert cli("submit", "--team", team_a.slug, "--kind", "compression", "--name", "alices", "--spec", SPEC)[0] == 0
    names = lambda out: [line.split()[-1] for line in out.strip().splitlines()[1:]]  # noqa: E731
    assert names(cli("jobs")[1]) == ["alices", "bobs"]
    assert names(cli("jobs", "--mine")[1]) == ["alices"]
    assert names(cli("jobs", "--user", "bob")[1]) == ["bobs"]
    assert names(cli("jobs", "--user", "nobody")[1]) == []
    status, _, err = cli("jobs", "--user", "a\x00b")
    assert status == 2  # the API's 400, not a database error
    assert "submitter" in err

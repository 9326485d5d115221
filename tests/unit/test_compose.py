"""docker/compose.yaml without a Docker engine: what `docker compose config` would refuse.

No engine runs on the development machine or in CI, so the file is checked the way Compose reads it:
against the Compose Specification's JSON schema (the copy check-jsonschema vendors), with its
variables resolved as docker/env.example documents them, and with every name it refers to (services,
volumes, secrets, build files, bind-mounted paths) resolved.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=60,
    )


def documented_variables() -> tuple[set[str], set[str]]:
    """(variables env.example sets, variables it only mentions in a comment such as `# PORT=8000`)."""
    set_, mentioned = set(), set()
    for line in (DOCKER / "env.example").read_text().splitlines():
        m = re.match(r"^(#\s*)?([A-Z_][A-Z0-9_]*)=", line)
        if m:
            (mentioned if m.group(1) else set_).add(m.group(2))
    return set_, mentioned


def test_compose_file_is_valid_under_the_compose_specification(tmp_path):
    result = validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr

    # The same check refuses a misspelt key, so the pass above means something.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:\n", "    healthchek:\n", 1))
    result = validate(broken)
    assert result.returncode != 0
    assert "healthchek" in result.stdout + result.stderr


def test_every_variable_compose_reads_is_in_env_example_and_the_required_ones_are_set_there():
    text = COMPOSE.read_text()
    set_, mentioned = documented_variables()
    used = {m.group(1): m.group(2) for m in VARIABLE.finditer(text)}
    assert used, "compose.yaml reads no variables?"
    required = {name for name, op in used.items() if op in (":?", "?")}
    assert {"SECRET_KEY", "POSTGRES_PASSWORD", "DEEPOPT_METRICS_TOKEN", "GRAFANA_ADMIN_PASSWORD"} <= required
    assert required <= set_, f"required but not set in env.example: {required - set_}"
    # Optional ones are at least named there (commented out, with their default), except the few with
    # an obvious default that the env file need not mention.
    undocumented = set(used) - set_ - mentioned - {"GRAFANA_ADMIN_USER", "DEEPOPT_ADMIN_USER"}
    assert not undocumented, f"compose.yaml reads {undocumented}, which env.example does not mention"
    # No bare $NAME (Compose would interpolate it too; a literal dollar must be written $$).
    bare = re.findall(r"(?<!\$)\$(?!\{|\$)[A-Za-z_]", text)
    assert not bare, bare


def resolved(values: dict[str, str] | None = None) -> dict:
    """compose.yaml with its variables replaced as `docker compose --env-file` would: from `values` (the
    .env; by default a placeholder for each variable env.example sets), else their default; a required
    one (`${NAME:?…}`) missing is an error, as in compose."""
    if values is None:
        values = {name: f"value-of-{name.lower()}" for name in documented_variables()[0]}

    def value(m: re.Match) -> str:
        name, op, arg = m.groups()
        current = values.get(name, "")
        if not current and op in (":?", "?"):
            raise AssertionError(f"compose needs {name}: {arg}")
        if not current and op in (":-", "-"):
            return arg
        return current

    return yaml.safe_load(VARIABLE.sub(value, COMPOSE.read_text()))


def test_everything_compose_refers_to_exists():
    compose = resolved()
    services, volumes, secrets = compose["services"], set(compose["volumes"]), set(compose["secrets"])
    assert {"postgres", "redis", "web", "worker", "beat", "gpu-node", "prometheus", "grafana"} == set(services)
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}'s missing check"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in volumes, f"{name} uses volume {source}, not declared"
        for secret in service.get("secrets", []):
            assert (secret["source"] if isinstance(secret, dict) else secret) in secrets
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT
            assert (context / build["dockerfile"]).is_file(), build
        for word in service.get("healthcheck", {}).get("test", []):
            if word.endswith(".py"):
                assert (ROOT / word).is_file(), f"{name}'s health check runs {word}, which does not exist"
        for port in service.get("ports", []):
            assert re.fullmatch(r"(127\.0\.0\.1:)?\d+:\d+", port), f"{name}: port {port!r} after interpolation"
    # Secrets come from a variable the env file sets; the app services all get the settings they need.
    set_, _ = documented_variables()
    for name, secret in compose["secrets"].items():
        assert secret.get("environment") in set_, name
    for name in ("web", "worker", "beat"):
        env = services[name]["environment"]
        assert env["DJANGO_SETTINGS_MODULE"] == "deepopt_web.settings.production"
        assert env["DATABASE_URL"] == "postgres://deepopt:value-of-postgres_password@postgres:5432/deepopt"
        assert env["SECRET_KEY"] == "value-of-secret_key"
    # Prometheus reads the token where compose mounts it.
    prometheus = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    files = {job.get("authorization", {}).get("credentials_file") for job in prometheus["scrape_configs"]}
    assert "/run/secrets/metrics_token" in files

"""Settings read the environment in one place; production refuses to start insecure.

Each case imports the settings in a fresh interpreter, because settings are read once per process.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Variables the settings read; a case starts from none of them so the developer's shell cannot leak in.
READ_BY_SETTINGS = ("SECRET_KEY", "DEBUG", "DATABASE_URL", "REDIS_URL", "ALLOWED_HOSTS", "SECURE_HSTS_SECONDS",
                    "SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "CONN_MAX_AGE",
                    "DJANGO_SETTINGS_MODULE")

PRINT_SETTINGS = """
import json
from django.conf import settings
db = settings.DATABASES["default"]
print(json.dumps({
    "DEBUG": settings.DEBUG,
    "SESSION_COOKIE_SECURE": settings.SESSION_COOKIE_SECURE,
    "CSRF_COOKIE_SECURE": settings.CSRF_COOKIE_SECURE,
    "SECURE_HSTS_SECONDS": settings.SECURE_HSTS_SECONDS,
    "SECURE_SSL_REDIRECT": settings.SECURE_SSL_REDIRECT,
    "ALLOWED_HOSTS": settings.ALLOWED_HOSTS,
    "REDIS_URL": settings.REDIS_URL,
    "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
    "ENGINE": db["ENGINE"], "NAME": str(db["NAME"]), "HOST": db.get("HOST", ""), "USER": db.get("USER", ""),
    "PORT": str(db.get("PORT", "")),
    "renderers": settings.REST_FRAMEWORK["DEFAULT_RENDERER_CLASSES"],
}))
"""


def run_python(code: str, module: str, **env: str) -> subprocess.CompletedProcess:
    # DJANGO_ALLOW_ASYNC_UNSAFE: the browser tests set it for their session; a deployment must not have it.
    clean = {k: v for k, v in os.environ.items() if k not in READ_BY_SETTINGS and k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    clean.update(DJANGO_SETTINGS_MODULE=module, **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True,
                          timeout=120, check=False)


def settings_of(module: str, **env: str) -> dict:
    done = run_python(PRINT_SETTINGS, module, **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _no_dotenv_secret() -> None:
    # base.py reads a developer's .env; one that sets SECRET_KEY would make the refusal test meaningless.
    dotenv = ROOT / ".env"
    if dotenv.exists() and "SECRET_KEY" in dotenv.read_text():
        pytest.skip(".env sets SECRET_KEY")


def test_production_settings_refuse_to_load_without_a_secret_key():
    done = run_python("import deepopt_web.settings.production", "deepopt_web.settings.production")
    assert done.returncode != 0
    assert "SECRET_KEY must be set" in done.stderr
    assert "ImproperlyConfigured" in done.stderr


def test_an_empty_secret_key_is_refused_too():
    done = run_python("import deepopt_web.settings.production", "deepopt_web.settings.production", SECRET_KEY="")
    assert done.returncode != 0
    assert "SECRET_KEY must be set" in done.stderr


def test_production_settings_are_secure_by_default():
    prod = settings_of("deepopt_web.settings.production", SECRET_KEY="x" * 50)
    assert prod["DEBUG"] is False
    assert prod["SESSION_COOKIE_SECURE"] is True
    assert prod["CSRF_COOKIE_SECURE"] is True
    assert prod["SECURE_SSL_REDIRECT"] is True
    assert prod["SECURE_HSTS_SECONDS"] > 0
    assert prod["renderers"] == ["drf_orjson_renderer.renderers.ORJSONRenderer"]  # no browsable API


def test_hsts_can_be_switched_off_for_a_first_deployment():
    prod = settings_of("deepopt_web.settings.production", SECRET_KEY="x" * 50, SECURE_HSTS_SECONDS="0")
    assert prod["SECURE_HSTS_SECONDS"] == 0


def test_production_passes_djangos_deployment_checks():
    code = ("from django.core.management import execute_from_command_line; "
            "execute_from_command_line(['manage.py', 'check', '--deploy', '--fail-level', 'ERROR'])")
    done = run_python(code, "deepopt_web.settings.production",
                      SECRET_KEY="k3y-" + "a1B2c3D4e5F6g7H8i9J0" * 3, ALLOWED_HOSTS="deepopt.example.org")
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = set(re.findall(r"\((\w+\.[WE]\d+)\)", done.stdout + done.stderr))
    # HSTS preload stays an explicit opt-in (SECURE_HSTS_PRELOAD): leaving the preload list takes months.
    assert warnings <= {"security.W021"}, done.stdout + done.stderr


def test_the_database_defaults_to_sqlite_under_var():
    local = settings_of("deepopt_web.settings.local")
    assert local["ENGINE"] == "django.db.backends.sqlite3"
    assert Path(local["NAME"]).parent == ROOT / "var"


def test_database_url_selects_postgresql():
    local = settings_of("deepopt_web.settings.local",
                        DATABASE_URL="postgres://deepopt@db.example:6543/deepopt_prod")
    assert local["ENGINE"] == "django.db.backends.postgresql"
    assert (local["HOST"], local["PORT"], local["USER"], local["NAME"]) == (
        "db.example", "6543", "deepopt", "deepopt_prod")


def test_redis_url_and_allowed_hosts_come_from_the_environment():
    defaults = settings_of("deepopt_web.settings.local")
    assert defaults["REDIS_URL"] == "redis://127.0.0.1:6379/0"
    custom = settings_of("deepopt_web.settings.local", REDIS_URL="redis://cache.example:6380/2",
                         ALLOWED_HOSTS="a.example,b.example")
    assert custom["REDIS_URL"] == custom["CELERY_BROKER_URL"] == "redis://cache.example:6380/2"
    assert custom["ALLOWED_HOSTS"] == ["a.example", "b.example"]


def test_local_settings_debug_can_be_turned_off():
    assert settings_of("deepopt_web.settings.local")["DEBUG"] is True
    assert settings_of("deepopt_web.settings.local", DEBUG="false")["DEBUG"] is False

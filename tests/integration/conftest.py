"""Integration fixtures: real Redis, real processes. Tests here skip (with the reason) only when Redis is down."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

# Integration tests use their own Redis database (not the 0 that `make run` uses), so a test run
# never reads or flushes a developer's queues. TEST_REDIS_URL overrides the whole URL.
TEST_REDIS_DB = 14


def test_redis_url() -> str:
    if os.environ.get("TEST_REDIS_URL"):
        return os.environ["TEST_REDIS_URL"]
    base = urlsplit(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    return urlunsplit(base._replace(path=f"/{TEST_REDIS_DB}"))


test_redis_url.__test__ = False  # a helper, not a test, despite its name


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a Redis that answers; skips the test (saying why) when none does."""
    import redis

    url = test_redis_url()
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"Redis does not answer on {url} ({exc}); start it (e.g. .ci/run does) to run this test.")
    return url


@pytest.fixture
def unique_queue(redis_url: str) -> Iterator[str]:
    """A queue name no other run uses; its Redis keys are removed afterwards."""
    import redis

    name = f"test.{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    # kombu keeps the queue (one list per priority) and its bindings in keys named after it.
    for key in client.scan_iter(match=f"*{name}*"):
        client.delete(key)


# compose.yaml's `redis` and `postgres` services stand in (test_compose_services, test_docker_images).
COMPOSE_REDIS_DB = 13


@pytest.fixture
def redis_db13_url() -> Iterator[str]:
    """Redis db 13 of this host, emptied before and after; skips when Redis does not answer."""
    import redis

    url = f"redis://127.0.0.1:6379/{COMPOSE_REDIS_DB}"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.flushdb()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"Redis does not answer on {url} ({exc}); compose's redis service stands in for it.")
    yield url
    client.flushdb()


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards; skips when DATABASE_URL names another engine or
    PostgreSQL does not answer."""
    import psycopg

    base = urlsplit(os.environ.get("DATABASE_URL") or "postgres://root@127.0.0.1:5432/postgres")
    if not base.scheme.startswith("postgres"):
        pytest.skip("compose runs PostgreSQL; DATABASE_URL points elsewhere")
    admin = urlunsplit(base._replace(path="/postgres"))
    name = f"deepopt_compose_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL does not answer at {base.hostname}:{base.port or 5432} ({exc})")
    yield urlunsplit(base._replace(path=f"/{name}"))
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

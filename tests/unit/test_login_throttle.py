"""Sign-in throttling (django-axes): too many failed sign-ins for one username from one address lock that
pair out, for the token endpoint, the login page and the admin's, even with the right password."""
from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db
TOKEN = "/api/v1/auth/token/"


@pytest.fixture(autouse=True)
def small_limit(settings):
    settings.AXES_FAILURE_LIMIT = 3


def token_attempt(password: str, address: str = "10.0.0.1", username: str = "alice"):  # noqa: ANN201
    return APIClient(REMOTE_ADDR=address).post(TOKEN, {"username": username, "password": password}, format="json")


def test_the_token_endpoint_locks_a_username_and_address_out_after_the_limit(alice):
    for _ in range(2):
        assert token_attempt("wrong").status_code == 400
    # The third failure reaches the limit and is answered 429; from then on even the right password is.
    assert token_attempt("wrong").status_code == 429
    locked = token_attempt("alice-pass-123")
    assert locked.status_code == 429
    assert "Too many failed sign-ins" in locked.json()["detail"]
    assert int(locked["Retry-After"]) == 15 * 60
    # Another address, or another username from the same address, is not affected: nobody can lock a
    # user out from elsewhere by guessing.
    assert token_attempt("alice-pass-123", address="10.0.0.2").status_code == 200
    assert token_attempt("nope", username="bob").status_code == 400


def test_a_success_before_the_limit_clears_the_count(alice):
    for _ in range(2):
        assert token_attempt("wrong").status_code == 400
    assert token_attempt("alice-pass-123").status_code == 200
    for _ in range(2):
        assert token_attempt("wrong").status_code == 400
    assert token_attempt("alice-pass-123").status_code == 200


def test_the_login_page_shows_the_lockout_and_lets_nobody_in(alice):
    client = Client(REMOTE_ADDR="10.0.0.3")
    statuses = [client.post("/login/", {"username": "alice", "password": "wrong"}).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # the form again with its error, then the lockout
    response = client.post("/login/", {"username": "alice", "password": "alice-pass-123"})
    assert response.status_code == 429
    html = response.content.decode()
    assert 'data-testid="login-lockout"' in html
    assert "try again in 15 minutes" in html
    assert "_auth_user_id" not in client.session
    assert client.get("/").status_code == 302  # still signed out
    # The lockout is shared with the API: the same pair is refused a token too.
    assert token_attempt("alice-pass-123", address="10.0.0.3").status_code == 429


def test_the_admin_login_is_guarded_by_the_same_count(dana):
    assert dana.is_staff  # so the right password would let her in, were she not locked out
    client = Client(REMOTE_ADDR="10.0.0.4")
    for _ in range(3):
        client.post("/admin/login/", {"username": dana.username, "password": "wrong"})
    response = client.post("/admin/login/", {"username": dana.username, "password": "dana-pass-123"})
    assert response.status_code == 429
    assert "_auth_user_id" not in client.session

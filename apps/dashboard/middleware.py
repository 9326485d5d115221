"""Websocket authentication by API token: `/ws/events/?token=<key>`, for clients that have no session.

It runs inside Channels' AuthMiddlewareStack (asgi.py), so the session's user is already in the scope.
A token, when given, decides: a valid token's user replaces the session's, and an unknown token or an
inactive user leaves the socket anonymous (refused by the consumer) even if a session came along, so a
bad credential is never silently ignored. The token is the REST API's (rest_framework.authtoken; the
same lookup as apps/accounts/authentication.py).
"""
from __future__ import annotations

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.contrib.auth.models import AnonymousUser


@database_sync_to_async
def user_for_token(key: str):  # noqa: ANN201
    from rest_framework.authtoken.models import Token

    token = Token.objects.select_related("user").filter(key=key).first()
    if token is None or not token.user.is_active:
        return AnonymousUser()
    return token.user


class TokenAuthMiddleware:
    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send):  # noqa: ANN001, ANN204
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query:
            key = query["token"][-1].strip()
            # DRF keys are 40 hex characters; anything else cannot match, so skip the query (a NUL byte
            # would not even reach PostgreSQL's text type).
            plausible = 0 < len(key) <= 64 and key.isascii() and key.isalnum()
            scope = {**scope, "user": await user_for_token(key) if plausible else AnonymousUser()}
        return await self.app(scope, receive, send)

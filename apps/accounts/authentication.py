"""API authentication: DRF's token scheme, with its query compiled once (every request makes it)."""
from __future__ import annotations

from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token

from .compiled import CompiledQuery

_TOKEN_WITH_USER = CompiledQuery(lambda key: Token.objects.select_related("user").filter(key=key)[:1], "\0key")


class TokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>`, exactly as DRF checks it (compiled.py says why it is compiled)."""

    def authenticate_credentials(self, key):  # noqa: ANN001, ANN201
        # DRF keys are 40 hex characters: anything else cannot match, and is not queried (PostgreSQL's
        # text type cannot even hold a NUL byte).
        found = _TOKEN_WITH_USER.objects(key) if key.isascii() and key.isalnum() and len(key) <= 64 else []
        if not found:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        token = found[0]
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return token.user, token

"""Cross-cutting API rules in one place: strict input, team scoping, atomic writes."""
from __future__ import annotations

import copy
import re
from collections.abc import Mapping

from django.db import transaction
from rest_framework import serializers, viewsets

from apps.accounts.compiled import CompiledQuery
from apps.accounts.models import Team

_TEAM_BY_ID = CompiledQuery(lambda pk: Team.objects.filter(pk=pk)[:1], -(2**40))
_TEAM_BY_SLUG = CompiledQuery(lambda slug: Team.objects.filter(slug=slug)[:1], "\0slug")
_MEMBERS_TEAM_BY_ID = CompiledQuery(
    lambda pk, user_id: Team.objects.filter(pk=pk, memberships__user_id=user_id)[:1], -(2**40), -(2**40) - 1)
_MEMBERS_TEAM_BY_SLUG = CompiledQuery(
    lambda slug, user_id: Team.objects.filter(slug=slug, memberships__user_id=user_id)[:1], "\0slug", -(2**40))


class StrictMixin:
    """Refuses keys it does not know: a typo like `keep_ration` is an error, not a silent default."""

    def to_internal_value(self, data):  # noqa: ANN001, ANN201
        if isinstance(data, Mapping):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            unknown = sorted(set(data) - writable)
            if unknown:
                raise serializers.ValidationError({key: ["Unknown field."] for key in unknown})
        return super().to_internal_value(data)


class StrictSerializer(StrictMixin, serializers.Serializer):
    def get_fields(self) -> dict[str, serializers.Field]:
        # DRF deep-copies every declared field for every serializer instance, running each field's
        # __init__ again: about half of a job submission's validation CPU (bench/README.md). The declared
        # fields are never bound themselves, and binding only sets attributes on the copy, so a shallow
        # copy is as good.
        return {name: _unbound_copy(field) for name, field in self._declared_fields.items()}


def _unbound_copy(field: serializers.Field) -> serializers.Field:
    if hasattr(field, "child") or hasattr(field, "child_relation") or getattr(field, "parent", None) is not None:
        # List-like fields bind their child to themselves when built: the child needs a copy too.
        return copy.deepcopy(field)
    clone = copy.copy(field)
    # A nested serializer builds its own fields, bound to itself, the first time it is used.
    clone.__dict__.pop("fields", None)
    return clone


class TeamScopedViewSet(viewsets.GenericViewSet):
    """Every queryset is the caller's teams' objects (staff: all), so another team's object is a 404.

    Subclasses set `model` with a `visible_to(user)` queryset method, and may add `select_related`.
    """

    model = None
    select_related: tuple[str, ...] = ()
    prefetch_related: tuple = ()

    def get_queryset(self):  # noqa: ANN201
        if getattr(self, "swagger_fake_view", False):  # schema generation has no user
            return self.model.objects.none()
        qs = self.model.objects.visible_to(self.request.user)
        if self.select_related:
            qs = qs.select_related(*self.select_related)
        if self.prefetch_related:
            qs = qs.prefetch_related(*self.prefetch_related)
        return qs

    def perform_create(self, serializer) -> None:  # noqa: ANN001
        with transaction.atomic():
            serializer.save()


def only_team(user, what: str) -> Team:  # noqa: ANN001
    """The caller's one team, for a request that names none; a 400 on `team` otherwise."""
    teams = list(Team.objects.filter(memberships__user=user)[:2])
    if len(teams) != 1:
        raise serializers.ValidationError(
            {"team": [f"Say which team the {what} is for." if teams else "You are not on any team."]})
    return teams[0]


SLUG = re.compile(r"[-a-zA-Z0-9_]{1,100}")  # Django's SlugField, ASCII


class TeamField(serializers.Field):
    """A team by id or slug, among the teams the caller can see; others read as 'not found'."""

    default_error_messages = {
        "not_found": "No team '{value}' that you belong to.",
        "invalid": "Give a team id or slug.",
    }

    def to_internal_value(self, data):  # noqa: ANN001, ANN201
        if isinstance(data, bool) or not isinstance(data, int | str) or data == "":
            self.fail("invalid")
        user = self.context["request"].user
        # Team.objects.visible_to(user) by id or slug, as compiled queries: every submission asks.
        if isinstance(data, int) or (data.isascii() and data.isdigit()):
            pk = int(data)
            if not 0 < pk < 2**63:
                found = []
            else:
                found = _TEAM_BY_ID.objects(pk) if user.is_staff else _MEMBERS_TEAM_BY_ID.objects(pk, user.pk)
        elif not SLUG.fullmatch(data):
            found = []  # no slug looks like this (a NUL byte would not even reach PostgreSQL's text type)
        else:
            found = _TEAM_BY_SLUG.objects(data) if user.is_staff else _MEMBERS_TEAM_BY_SLUG.objects(data, user.pk)
        found = found[0] if found else None
        if found is None:
            self.fail("not_found", value=str(data)[:100])
        return found

    def to_representation(self, value):  # noqa: ANN001, ANN201
        return value.pk

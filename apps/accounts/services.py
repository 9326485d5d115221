"""Account verbs: create users, add members."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db import transaction

from .models import Membership, Team


def create_user(*, username: str, password: str, email: str = "", is_staff: bool = False):  # noqa: ANN201
    return get_user_model().objects.create_user(username=username, password=password, email=email,
                                                is_staff=is_staff)


def set_membership(*, team: Team, user, role: str = Membership.Role.MEMBER) -> tuple[Membership, bool]:
    """Add the user to the team, or change their role; returns (membership, created)."""
    with transaction.atomic():
        membership, created = Membership.objects.update_or_create(team=team, user=user, defaults={"role": role})
    return membership, created


def remove_membership(*, team: Team, user) -> bool:
    deleted, _ = Membership.objects.filter(team=team, user=user).delete()
    return bool(deleted)

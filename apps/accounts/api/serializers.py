from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers

from apps.accounts.api.base import StrictMixin, StrictSerializer
from apps.accounts.models import Membership, Team
from apps.accounts.permissions import lead_team_ids_of

User = get_user_model()


class TeamSerializer(StrictMixin, serializers.ModelSerializer):
    class Meta:
        model = Team
        fields = ["id", "name", "slug", "weight", "max_gpus", "gpu_hours_per_month", "max_gpus_per_job",
                  "notify_url", "created_at"]
        read_only_fields = ["id", "slug", "created_at"]
        extra_kwargs = {
            "weight": {"min_value": 0.01, "max_value": 1000.0},
            "max_gpus": {"max_value": 100_000},
            "gpu_hours_per_month": {"max_value": 100_000_000},
            "max_gpus_per_job": {"min_value": 1, "max_value": 100_000},
        }

    def validate_notify_url(self, value: str) -> str:
        if value and not value.lower().startswith(("http://", "https://")):
            raise serializers.ValidationError("The address must be http:// or https://.")
        return value

    def to_representation(self, team: Team) -> dict:
        data = super().to_representation(team)
        # The webhook's address may carry a secret (a chat hook's token): staff and the team's leads see it.
        request = self.context.get("request")
        user = getattr(request, "user", None)
        if user is not None and getattr(user, "is_staff", False):
            return data
        role = getattr(team, "viewer_role", None)  # Team.objects.visible_to's annotation, when it made the query
        leads = role == Membership.Role.LEAD if role is not None else (
            user is not None and user.is_authenticated and team.pk in lead_team_ids_of(user))
        if not leads:
            data.pop("notify_url", None)
        return data

    def validate_name(self, value: str) -> str:
        from django.utils.text import slugify

        if not slugify(value):
            raise serializers.ValidationError("The name needs at least one letter or digit.")
        clash = Team.objects.filter(slug=slugify(value)[:100])
        if self.instance is not None:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise serializers.ValidationError("A team with this name already exists.")
        return value


class UserSerializer(StrictMixin, serializers.ModelSerializer):
    password = serializers.CharField(write_only=True, style={"input_type": "password"}, max_length=128)

    class Meta:
        model = User
        fields = ["id", "username", "email", "password", "is_staff"]
        read_only_fields = ["id", "is_staff"]

    def validate(self, attrs: dict) -> dict:
        try:
            validate_password(attrs["password"], User(username=attrs.get("username"), email=attrs.get("email", "")))
        except DjangoValidationError as exc:
            raise serializers.ValidationError({"password": list(exc.messages)}) from exc
        return attrs

    def create(self, validated_data: dict):  # noqa: ANN201
        from apps.accounts.services import create_user

        return create_user(**validated_data)


class UsernameField(serializers.SlugRelatedField):
    """A user by username. A NUL byte is refused before the lookup: PostgreSQL's text type cannot hold one,
    so the query itself would fail (a 500 where the answer is that no such user exists)."""

    def to_internal_value(self, data):  # noqa: ANN001, ANN201
        if isinstance(data, str) and "\x00" in data:
            raise serializers.ValidationError("Null characters are not allowed.")
        return super().to_internal_value(data)


class MembershipSerializer(StrictSerializer):
    username = UsernameField(slug_field="username", queryset=User.objects.all(), source="user")
    role = serializers.ChoiceField(choices=Membership.Role.choices, default=Membership.Role.MEMBER)
    team = serializers.IntegerField(source="team_id", read_only=True)
    created_at = serializers.DateTimeField(read_only=True)


class MeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.EmailField()
    is_staff = serializers.BooleanField()
    teams = serializers.SerializerMethodField()

    def get_teams(self, user) -> list[dict]:  # noqa: ANN001
        return [
            {"id": m.team_id, "name": m.team.name, "slug": m.team.slug, "role": m.role}
            for m in user.memberships.select_related("team")
        ]

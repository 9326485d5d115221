from __future__ import annotations

from axes.helpers import get_client_ip_address
from axes.utils import reset as axes_reset
from django.contrib.auth import get_user_model
from django.db import transaction
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts import services
from apps.accounts.api.base import TeamScopedViewSet
from apps.accounts.api.serializers import MembershipSerializer, MeSerializer, TeamSerializer, UserSerializer
from apps.accounts.lockout import lockout_response
from apps.accounts.models import Membership, Team
from apps.accounts.permissions import can_manage_team

User = get_user_model()


class TokenSerializer(AuthTokenSerializer):
    """DRF's serializer with the model's length limits: a username longer than any user's is a 400
    before the password check, as on the login form, instead of a failure django-axes cannot record
    (its username column is 255 characters; PostgreSQL refuses longer ones)."""

    username = serializers.CharField(label="Username", write_only=True,
                                     max_length=User._meta.get_field(User.USERNAME_FIELD).max_length)
    password = serializers.CharField(label="Password", style={"input_type": "password"}, trim_whitespace=False,
                                     write_only=True, max_length=4096)


class TokenView(ObtainAuthToken):
    """Exchange a username and password for an API token (the same token every time). After too many
    failures for one username from one address, 429 (django-axes; settings AXES_*)."""

    serializer_class = TokenSerializer

    @extend_schema(
        request=TokenSerializer,
        responses={
            200: TokenSerializer,
            400: OpenApiResponse(description="Wrong username or password, or a field missing."),
            429: OpenApiResponse(
                response=inline_serializer("LockedOut", {"detail": serializers.CharField()}),
                description="Too many failed sign-ins for this username from this address; see Retry-After.",
            ),
        },
    )
    def post(self, request, *args, **kwargs):  # noqa: ANN001, ANN201
        try:
            response = super().post(request, *args, **kwargs)
        except ValidationError:
            if getattr(request, "axes_locked_out", False):
                return lockout_response(request._request)
            raise
        # A success clears the pair's failures, as a session login does (axes listens for user_logged_in,
        # which a token exchange does not send).
        axes_reset(ip=get_client_ip_address(request._request), username=request.data.get("username"))
        return response



class MeView(APIView):
    @extend_schema(responses=MeSerializer)
    def get(self, request):  # noqa: ANN001, ANN201
        return Response(MeSerializer(request.user).data)


class IsStaffForWrites(permissions.BasePermission):
    def has_permission(self, request, view) -> bool:  # noqa: ANN001
        return request.method in permissions.SAFE_METHODS or request.user.is_staff


class TeamViewSet(TeamScopedViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                  mixins.UpdateModelMixin):
    """Teams and their quotas. Staff create teams and set quotas; members read their own teams."""

    model = Team
    serializer_class = TeamSerializer
    permission_classes = [permissions.IsAuthenticated, IsStaffForWrites]
    ordering_fields = ["name", "created_at"]

    @extend_schema(request=MembershipSerializer, responses=MembershipSerializer(many=True))
    @action(detail=True, methods=["get", "post"], serializer_class=MembershipSerializer,
            permission_classes=[permissions.IsAuthenticated])
    def members(self, request, pk=None):  # noqa: ANN001, ANN201
        """List the team's members, or add one / change a role (staff or the team's lead)."""
        team = self.get_object()
        if request.method == "GET":
            memberships = team.memberships.select_related("user").order_by("user__username")
            page = self.paginate_queryset(memberships)
            return self.get_paginated_response(MembershipSerializer(page, many=True).data)
        if not can_manage_team(request.user, team):
            raise PermissionDenied("Only staff or a lead of this team can manage its members.")
        serializer = MembershipSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        membership, created = services.set_membership(
            team=team, user=serializer.validated_data["user"], role=serializer.validated_data["role"]
        )
        return Response(MembershipSerializer(membership).data,
                        status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(request=None, responses={204: None})
    @action(detail=True, methods=["delete"], url_path=r"members/(?P<username>[\w.@+-]+)",
            permission_classes=[permissions.IsAuthenticated])
    def remove_member(self, request, pk=None, username=None):  # noqa: ANN001, ANN201
        team = self.get_object()
        if not can_manage_team(request.user, team):
            raise PermissionDenied("Only staff or a lead of this team can manage its members.")
        user = User.objects.filter(username=username).first()
        if user is None or not services.remove_membership(team=team, user=user):
            raise NotFound("No such member.")
        return Response(status=status.HTTP_204_NO_CONTENT)

    def perform_update(self, serializer) -> None:  # noqa: ANN001
        with transaction.atomic():
            serializer.save()


class UserViewSet(mixins.CreateModelMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                  viewsets.GenericViewSet):
    """User accounts (staff only)."""

    queryset = User.objects.order_by("username")
    serializer_class = UserSerializer
    permission_classes = [permissions.IsAdminUser]
    filterset_fields = ["username"]


__all__ = ["MeView", "TeamViewSet", "TokenView", "UserViewSet", "Membership"]

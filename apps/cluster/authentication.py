"""Node tokens: `Authorization: Node <token>`, accepted by the agent API only.

A node is not a user. Its requests authenticate as a `NodePrincipal` (request.user) with the node as
request.auth. Only the /api/v1/agent/ views list this class, and only they accept it: every other
endpoint keeps the default user authentication, so a node token there is a 401; and the agent views
list no user authentication, so a user's token there is a 401 too.
"""
from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from .models import GpuNode, hash_node_token


class NodePrincipal:
    """Stands in for request.user on agent requests; carries the node, has no user permissions."""

    is_authenticated = True
    is_active = True
    is_staff = False
    is_superuser = False
    is_anonymous = False
    pk = None
    id = None

    def __init__(self, node: GpuNode) -> None:
        self.node = node
        self.username = f"node:{node.name}"

    def __str__(self) -> str:
        return self.username


class NodeTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Node"

    def authenticate(self, request):  # noqa: ANN001, ANN201
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Give the node token as `Authorization: Node <token>`.")
        try:
            token = header[1].decode()
        except UnicodeError as exc:
            raise exceptions.AuthenticationFailed("The node token has characters a token never has.") from exc
        node = GpuNode.objects.filter(token_hash=hash_node_token(token)).first()
        if node is None:
            raise exceptions.AuthenticationFailed("Unknown node token.")
        return NodePrincipal(node), node

    def authenticate_header(self, request) -> str:  # noqa: ANN001
        return self.keyword


class IsNode(permissions.BasePermission):
    def has_permission(self, request, view) -> bool:  # noqa: ANN001
        return isinstance(request.auth, GpuNode)


class NodeTokenScheme(OpenApiAuthenticationExtension):
    """The node token in the OpenAPI schema (drf-spectacular finds extensions by subclassing)."""

    target_class = NodeTokenAuthentication
    name = "nodeToken"

    def get_security_definition(self, auto_schema) -> dict:  # noqa: ANN001
        return {"type": "apiKey", "in": "header", "name": "Authorization",
                "description": "`Node <token>`: the node's token, which POST /api/v1/nodes/ returned once."}

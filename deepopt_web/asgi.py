"""ASGI entry point: HTTP through Django, websockets through Channels under /ws/."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deepopt_web.settings.local")
# Django must be set up before the routing imports consumers (and their models).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from apps.dashboard.middleware import TokenAuthMiddleware  # noqa: E402
from apps.dashboard.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # The Origin check keeps other sites' pages from opening a socket with the user's cookie; clients
        # outside a browser send an Origin of the server (e.g. `Origin: https://deepopt.example`).
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(websocket_urlpatterns)))
        ),
    }
)

"""The reference that issue 2 measured DeepOpt's goals against: a bare DRF ModelViewSet create with
token auth on SQLite, served by gunicorn with 2 sync workers.

bench/api.py runs it on the same machine in the same run, so that a busy machine shows in the reference
too: the issue measured it at about 240 requests/s with 50 closed-loop clients.

    BENCH_REFERENCE_DB=/tmp/ref.sqlite3 python bench/reference_app.py setup   # prints the token
    BENCH_REFERENCE_DB=/tmp/ref.sqlite3 gunicorn --chdir bench -w 2 reference_app:application
"""
from __future__ import annotations

import os
import sys

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="reference-benchmark-only",  # noqa: S106 - a throwaway app on 127.0.0.1
    ALLOWED_HOSTS=["127.0.0.1"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
                    "django.contrib.messages", "rest_framework", "rest_framework.authtoken", "reference"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["BENCH_REFERENCE_DB"]}},
    # What `django-admin startproject` gives.
    MIDDLEWARE=[
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
    ],
    REST_FRAMEWORK={
        "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.TokenAuthentication"],
        "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    },
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    USE_TZ=True,
    TIME_ZONE="UTC",
)


# The app label "reference" is this very module.
sys.modules.setdefault("reference", sys.modules[__name__])
django.setup()

from django.db import models  # noqa: E402
from django.urls import include, path  # noqa: E402
from rest_framework import routers, serializers, viewsets  # noqa: E402


class Item(models.Model):
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=20)
    gpus = models.PositiveIntegerField(default=1)
    spec = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "reference"


class ItemSerializer(serializers.ModelSerializer):
    class Meta:
        model = Item
        fields = ["id", "name", "kind", "gpus", "spec", "created_at"]


class ItemViewSet(viewsets.ModelViewSet):
    queryset = Item.objects.all()
    serializer_class = ItemSerializer


router = routers.DefaultRouter()
router.register("items", ItemViewSet)
urlpatterns = [path("", include(router.urls))]

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()


def setup() -> str:
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from rest_framework.authtoken.models import Token

    call_command("migrate", verbosity=0)
    with connection.schema_editor() as editor:  # the app is this module, without migrations
        editor.create_model(Item)
    user = User.objects.create_user("reference", password="reference-pass")  # noqa: S106
    return Token.objects.create(user=user).key


if __name__ == "__main__" and sys.argv[1:] == ["setup"]:
    print(setup())

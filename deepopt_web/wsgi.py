"""WSGI entry point: the HTTP API and pages under a pre-forking server (gunicorn)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deepopt_web.settings.local")
application = get_wsgi_application()

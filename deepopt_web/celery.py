"""The Celery app: settings come from Django's, namespaced CELERY_*."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deepopt_web.settings.local")

app = Celery("deepopt")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

"""Make the first admin if there is none (make run). The password is printed once, never stored."""
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the admin user if no superuser exists (DEEPOPT_ADMIN_USER / DEEPOPT_ADMIN_PASSWORD)."

    def handle(self, *args, **options) -> None:
        import os

        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return
        username = settings.DEEPOPT_ADMIN_USER
        password = os.environ.get("DEEPOPT_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        shown = "(from DEEPOPT_ADMIN_PASSWORD)" if os.environ.get("DEEPOPT_ADMIN_PASSWORD") else password
        self.stdout.write(f"Created admin user '{username}' with password: {shown}  -- shown once, keep it.")

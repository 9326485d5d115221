"""Make (or find) a node for this machine, for `make run` and `make worker`, and keep its token in var/.

The node belongs to the admin's team (the first team DEEPOPT_ADMIN_USER leads or is on; a team
"Local" led by the admin when there is none). Its token is written to var/nodes/<name>/token (mode
0600, never committed: var/ is ignored) and reused while it still matches; otherwise a new one is
issued. The agent started on it reports the real GPUs (or CPU slots) at registration.
"""
from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from apps.accounts.models import Membership, Team
from apps.cluster.models import GpuNode, hash_node_token, node_name_validator
from apps.cluster.services import register_node


def token_path(name: str) -> Path:
    return Path(settings.VAR_DIR) / "nodes" / name / "token"


def admin_team() -> Team:
    admin = get_user_model().objects.filter(username=settings.DEEPOPT_ADMIN_USER).first()
    if admin is not None:
        membership = (Membership.objects.filter(user=admin).select_related("team")
                      .order_by("-role", "team__name").first())  # "lead" sorts after "member": leads first
        if membership is not None:
            return membership.team
    team, _ = Team.objects.get_or_create(slug="local", defaults={"name": "Local"})
    if admin is not None:
        Membership.objects.get_or_create(user=admin, team=team, defaults={"role": Membership.Role.LEAD})
    return team


def local_devices(slots: int) -> tuple[str, list[dict]]:
    from workers.agent import Nvml, cpu_slots

    gpus = Nvml().inventory()
    return ("gpu", gpus) if gpus else ("cpu", cpu_slots(slots))


class Command(BaseCommand):
    help = "Create or find this machine's local node and store its token under var/nodes/<name>/token."

    def add_arguments(self, parser) -> None:  # noqa: ANN001
        parser.add_argument("--name", default="local-1")
        parser.add_argument("--slots", type=int, default=2, help="CPU slots when the machine has no GPU")
        parser.add_argument("--hostname", default="127.0.0.1", help="the address other nodes reach it at")

    def handle(self, *args, name: str, slots: int, hostname: str, **options) -> None:
        try:
            node_name_validator(name)
        except Exception as exc:
            raise CommandError(f"Bad node name {name!r}: lowercase letters, digits and dashes only.") from exc
        if slots < 1:
            raise CommandError("--slots must be at least 1.")
        path = token_path(name)
        with transaction.atomic():
            node = GpuNode.objects.select_for_update().filter(name=name).first()
            if node is None:
                device_type, devices = local_devices(slots)
                node, token = register_node(team=admin_team(), name=name, hostname=hostname, rack="local",
                                            gpus=devices, device_type=device_type, labels={"local": "true"})
                created = True
            else:
                created = False
                known = path.read_text().strip() if path.is_file() else ""
                if known and hash_node_token(known) == node.token_hash:
                    token = None
                else:
                    token = node.issue_token()
                    node.save(update_fields=["token_hash"])
        if token is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(token + "\n")
        devices = node.gpus.count()
        kind = "GPUs" if node.device_type == GpuNode.DeviceType.GPU else "CPU slots"
        self.stdout.write(f"{'Registered' if created else 'Found'} local node {node.name} ({devices} {kind}, "
                          f"team {node.team.name}); its token is in {path}.")

"""GPU nodes, their GPUs and the tokens they authenticate with."""
from __future__ import annotations

import hashlib
import secrets

from django.core.validators import RegexValidator
from django.db import models

from apps.accounts.models import Team, TeamOwnedQuerySet

node_name_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9-]{0,62}$",
    "Use lowercase letters, digits and dashes (it names the node's Celery queue, node.<name>).",
)


def hash_node_token(token: str) -> str:
    # Tokens are 256-bit random strings, so a fast hash is enough; only the hash is stored.
    return hashlib.sha256(token.encode()).hexdigest()


def new_node_token() -> str:
    return "dn_" + secrets.token_urlsafe(32)


class GpuNode(models.Model):
    class State(models.TextChoices):
        ACTIVE = "active", "Active"
        DRAINING = "draining", "Draining"
        STANDBY = "standby", "Standby"
        DOWN = "down", "Down"

    class DeviceType(models.TextChoices):
        GPU = "gpu", "GPU"
        CPU = "cpu", "CPU slots"

    name = models.CharField(max_length=63, unique=True, validators=[node_name_validator])
    hostname = models.CharField(max_length=253)
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="nodes")
    rack = models.CharField(max_length=63, default="default")
    state = models.CharField(max_length=10, choices=State.choices, default=State.ACTIVE)
    device_type = models.CharField(max_length=3, choices=DeviceType.choices, default=DeviceType.GPU)
    labels = models.JSONField(default=dict, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TeamOwnedQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        indexes = [models.Index(fields=["team", "state"]), models.Index(fields=["rack", "state"])]

    def __str__(self) -> str:
        return self.name

    def issue_token(self) -> str:
        """Set a new token and return it in clear; only its hash is kept."""
        token = new_node_token()
        self.token_hash = hash_node_token(token)
        return token

    @property
    def queue_name(self) -> str:
        return f"node.{self.name}"


class Gpu(models.Model):
    node = models.ForeignKey(GpuNode, on_delete=models.CASCADE, related_name="gpus")
    index = models.PositiveSmallIntegerField()
    model = models.CharField(max_length=100)
    memory_mb = models.PositiveIntegerField()
    uuid = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["node__name", "index"]
        constraints = [models.UniqueConstraint(fields=["node", "index"], name="one_gpu_per_node_index")]

    def __str__(self) -> str:
        return f"{self.node.name}:{self.index} ({self.model})"


class MetricSample(models.Model):
    """One telemetry reading from a node's agent: a GPU (gpu_index set) or the host (gpu_index null).

    For a GPU, `utilization` is the share of time a kernel ran and the memory fields are the GPU's; for
    the host they are CPU use and host RAM. The forecaster rolls these up over time ranges, hence the
    (node, gpu_index, ts) and (ts) indexes.
    """

    node = models.ForeignKey(GpuNode, on_delete=models.CASCADE, related_name="metric_samples")
    gpu_index = models.PositiveSmallIntegerField(null=True, blank=True)
    ts = models.DateTimeField()
    utilization = models.FloatField(null=True, blank=True, help_text="Percent.")
    memory_used_mb = models.PositiveIntegerField(null=True, blank=True)
    memory_total_mb = models.PositiveIntegerField(null=True, blank=True)
    temperature_c = models.FloatField(null=True, blank=True)
    power_w = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["ts", "id"]
        indexes = [
            models.Index(fields=["node", "gpu_index", "ts"], name="metric_node_gpu_ts"),
            models.Index(fields=["ts"], name="metric_ts"),
        ]

    def __str__(self) -> str:
        where = "host" if self.gpu_index is None else f"gpu {self.gpu_index}"
        return f"{self.node_id} {where} @ {self.ts:%Y-%m-%d %H:%M:%S}"

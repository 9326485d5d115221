"""Teams, their quotas and who belongs to them."""
from __future__ import annotations

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils.text import slugify


class TeamOwnedQuerySet(models.QuerySet):
    """Objects with a `team`: a user sees their teams' (staff see all). Another team's object is then
    simply not found, which is what makes it a 404."""

    def visible_to(self, user):  # noqa: ANN001, ANN201
        if user.is_staff:
            return self
        from .permissions import team_ids_of

        return self.filter(team_id__in=team_ids_of(user))


class TeamQuerySet(models.QuerySet):
    def visible_to(self, user) -> TeamQuerySet:
        if user.is_staff:
            return self
        # With the user's role in each team, from the same join (the team serializer shows leads more).
        return self.filter(memberships__user=user).annotate(viewer_role=models.F("memberships__role"))


class Team(models.Model):
    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=100, unique=True)
    # Share of the cluster relative to other teams in the weighted fair queue.
    weight = models.FloatField(default=1.0, validators=[MinValueValidator(0.01)])
    max_gpus = models.PositiveIntegerField(default=8, help_text="GPUs the team may hold at once.")
    gpu_hours_per_month = models.PositiveIntegerField(
        default=1000, help_text="GPU-hours the team may use in a calendar month."
    )
    max_gpus_per_job = models.PositiveIntegerField(default=8)
    # Each job of the team that ends (succeeded, failed, cancelled) is POSTed here as JSON: a chat or CI hook,
    # Slurm's --mail-type=END. Set by staff; shown to staff and the team's leads (the URL may carry a token).
    notify_url = models.URLField(max_length=500, blank=True,
                                 help_text="Finished jobs are POSTed here as JSON (optional; http or https).")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TeamQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs) -> None:
        if not self.slug:
            self.slug = slugify(self.name)[:100] or "team"
        super().save(*args, **kwargs)


class Membership(models.Model):
    class Role(models.TextChoices):
        MEMBER = "member", "Member"
        LEAD = "lead", "Lead"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "team"], name="one_membership_per_user_and_team")]
        ordering = ["team__name", "user__username"]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.role})"

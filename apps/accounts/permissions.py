"""Who may do what, in one place: team scoping for every object in DeepOpt."""
from __future__ import annotations

from .compiled import CompiledQuery
from .models import Membership, Team

# Every list request of a non-staff user asks: compiled once (compiled.py says why). One query gives both the
# teams and the roles, so that knowing where the user leads costs nothing more.
_TEAM_ROLES = CompiledQuery(
    lambda user_id: Membership.objects.filter(user_id=user_id).values_list("team_id", "role"), -(2**40))


def _memberships(user) -> None:  # noqa: ANN001
    rows = list(_TEAM_ROLES.values(user.pk))
    user._deepopt_team_ids = {team_id for team_id, _ in rows}
    user._deepopt_lead_team_ids = {team_id for team_id, role in rows if role == Membership.Role.LEAD}


def team_ids_of(user) -> set[int]:
    """Ids of the teams the user belongs to, cached on the user object for the request."""
    if getattr(user, "_deepopt_team_ids", None) is None:
        _memberships(user)
    return user._deepopt_team_ids


def lead_team_ids_of(user) -> set[int]:
    """Ids of the teams the user leads, cached with team_ids_of (the same query)."""
    if getattr(user, "_deepopt_lead_team_ids", None) is None:
        _memberships(user)
    return user._deepopt_lead_team_ids


def can_see_team(user, team: Team | int) -> bool:
    team_id = team if isinstance(team, int) else team.pk
    return bool(user.is_staff or team_id in team_ids_of(user))


def can_manage_team(user, team: Team | int) -> bool:
    """Staff, or a lead of this team: manage members and the team's nodes."""
    team_id = team if isinstance(team, int) else team.pk
    return bool(user.is_staff or team_id in lead_team_ids_of(user))


def can_cancel_job(user, job) -> bool:  # noqa: ANN001
    """The submitter, a lead of the job's team, or staff. Teammates see each other's jobs but do not stop them."""
    return bool(user.is_staff or job.submitter_id == user.pk or job.team_id in lead_team_ids_of(user))

"""One mapping from domain errors to HTTP: illegal state changes are 409, with a JSON body."""
from __future__ import annotations

from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from apps.cluster.services import IllegalNodeTransition
from apps.scheduling.states import IllegalTransition


def exception_handler(exc, context):  # noqa: ANN001, ANN201
    if isinstance(exc, IllegalTransition | IllegalNodeTransition):
        return Response(
            {"detail": str(exc), "state": exc.current, "requested": exc.target},
            status=status.HTTP_409_CONFLICT,
        )
    return drf_exception_handler(exc, context)

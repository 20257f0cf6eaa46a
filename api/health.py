"""GET /health: liveness, the number of running and queued jobs, and the base model's state. No key
needed, nothing read from disk but the registry's counts. Knows nothing of the other routes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import registry
from models import HealthPublic

router = APIRouter()


@router.get("/health", response_model=HealthPublic)
def health(request: Request) -> HealthPublic:
    """Liveness, with the number of running and queued jobs and the base model's state."""
    counts = registry(request).counts()
    return HealthPublic(jobs_running=counts.get("running", 0), jobs_queued=counts.get("queued", 0),
                        model=request.app.state.warmup.state)

"""``/v1/account`` (the caller's plan, usage and limits) and ``/v1/categories``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from engines.registry import CATEGORIES, available_categories
from gateway.api.models import Account, ErrorBody
from gateway.auth import KeyDep, ServiceDep
from gateway.store import month_of

router = APIRouter(prefix="/v1", tags=["account"])


@router.get("/account", response_model=Account, responses={401: {"model": ErrorBody}},
            summary="Your key's plan, usage this month and limits")
def account(key: KeyDep, service: ServiceDep) -> dict[str, Any]:
    month = month_of(time.time())
    images, seconds = service.db.usage(key.id, month)
    plan = service.settings.plan(key.plan)
    return {"id": key.id, "name": key.name, "plan": key.plan,
            "usage": {"month": month, "images": images, "video_seconds": round(seconds, 3)},
            "limits": plan.model_dump()}


@router.get("/categories", responses={401: {"model": ErrorBody}},
            summary="Categories this server can redact")
def categories(key: KeyDep) -> dict[str, Any]:
    available = set(available_categories())
    return {"data": [{"name": c.name, "aliases": list(c.aliases), "description": c.description,
                      "available": c.name in available, "covered_as": c.maps_to}
                     for c in CATEGORIES]}

"""Liveness."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness")
async def health() -> dict[str, str]:
    """200 while the API process serves requests.

    `async`, so it needs no thread: it answers while every thread and connection is busy, and
    it is never counted against the in-flight limit (api.middleware)."""
    return {"status": "ok"}

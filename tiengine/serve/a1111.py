"""A1111-compatible routes, `/sdapi/v1/...` (to be filled)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

if TYPE_CHECKING:
    from tiengine.serve.state import ServeState


def router(state: ServeState) -> APIRouter:
    return APIRouter(prefix="/sdapi/v1")

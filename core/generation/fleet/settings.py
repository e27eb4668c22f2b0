"""The redis backend's own keys of ``[generation]``."""

from __future__ import annotations

from pydantic import Field

from core.config import BotSettings, GenerationSection
from core.generation.local.settings import LocalSettings

FLEET_KEYS = frozenset({"url", "queue"})  # the keys the fleet adds to the local backend's


class FleetSettings(LocalSettings):
    """The queue front ends and workers meet on. A file shared by front ends and workers
    also sizes the workers' local backend, so its keys are allowed here too."""

    url: str | None = None  # the Redis URL (front ends; workers read worker.url)
    queue: str = Field(default="parley:gen", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")


def inner_settings(settings: BotSettings) -> BotSettings:
    """``settings`` as a worker's inner generator sees them: its ``worker.backend``, and
    ``[generation]`` without the fleet's own keys (which that backend does not know)."""
    table = {key: value for key, value in settings.generation.model_dump().items()
             if key not in FLEET_KEYS}
    table["backend"] = settings.worker.backend
    return settings.model_copy(update={"generation": GenerationSection.model_validate(table)})

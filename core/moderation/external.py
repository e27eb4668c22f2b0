"""External classifiers, for teams that want one: a moderation endpoint or a guard model.

``openai-moderation``: an OpenAI-compatible ``POST {url}/moderations`` endpoint; its
category scores are mapped onto Parley's categories (harassment -> insult,
harassment/threatening and violence -> threat, self-harm/* -> selfharm, ...).

``guard-model``: a Llama Guard / ShieldGemma style model behind an OpenAI-compatible
``POST {url}/chat/completions`` (``parley worker``'s HTTP API, vLLM, llama.cpp server):
it answers ``safe`` or ``unsafe`` and a line of hazard codes (``S1,S10``), mapped by
``categories``; a code it does not map counts as ``insult``.

Both are configured under ``[moderation.classifier_options.NAME]`` (``url``, ``model``,
``api_key`` from ``${ENV}``, ``timeout``) and run under the policy's ``filter_timeout``
too, with the usual fail modes: input fails open to the rules by default, output fails
closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import aiohttp
from pydantic import Field

from core.config import BotSettings, Section, validate_section
from core.lifecycle import ServiceBase

# OpenAI moderation categories -> Parley's.
OPENAI_CATEGORIES = {
    "harassment": "insult", "harassment/threatening": "threat", "violence": "threat",
    "violence/graphic": "threat", "hate": "hate", "hate/threatening": "hate",
    "sexual": "sexual", "sexual/minors": "sexual", "self-harm": "selfharm",
    "self-harm/intent": "selfharm", "self-harm/instructions": "selfharm",
}
# Llama Guard 3 hazard codes -> Parley's.
LLAMA_GUARD_CATEGORIES = {
    "S1": "threat", "S3": "sexual", "S4": "sexual", "S9": "threat", "S10": "hate",
    "S11": "selfharm", "S12": "sexual",
}


class ExternalOptions(Section):
    """``[moderation.classifier_options.NAME]`` of an external classifier."""

    url: str
    model: str
    api_key: str | None = None
    timeout: float = Field(default=2.0, gt=0.0)
    categories: dict[str, str] = {}  # the service's category or code -> Parley's


class _HttpClassifier(ServiceBase):
    """An HTTP session with a timeout, opened at start and closed at stop."""

    name = ""
    default_categories: Mapping[str, str] = {}

    def __init__(self, options: ExternalOptions) -> None:
        self.options = options
        self.categories = {**self.default_categories, **options.categories}
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: BotSettings) -> Self:
        """Built from ``[moderation.classifier_options.NAME]`` (validated here)."""
        raw = settings.moderation.classifier_options.get(cls.name)
        if raw is None:
            from core.errors import ConfigError

            raise ConfigError(f"{settings.source}: moderation.classifier_options.{cls.name}: "
                              f"required by classifier = {cls.name!r} (url and model)")
        return cls(validate_section(ExternalOptions, raw, source=settings.source,
                                    prefix=f"moderation.classifier_options.{cls.name}"))

    async def _start(self) -> None:
        headers = {}
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self.options.timeout))

    async def _stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        if self._session is None:
            raise RuntimeError(f"{self.name} classifier is used before start()")
        url = self.options.url.rstrip("/") + path
        async with self._session.post(url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{self.name}: HTTP {response.status} from {url}")
            return await response.json()


class OpenAIModerationClassifier(_HttpClassifier):
    """An OpenAI-compatible moderation endpoint; see the module docstring."""

    name = "openai-moderation"
    default_categories = OPENAI_CATEGORIES

    async def score(self, text: str) -> dict[str, float]:
        """The endpoint's category scores, mapped onto Parley's categories."""
        data = await self._post("/moderations", {"model": self.options.model, "input": text})
        try:
            raw = data["results"][0]["category_scores"]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"{self.name}: unexpected answer") from None
        scores: dict[str, float] = {}
        for theirs, value in raw.items():
            ours = self.categories.get(theirs)
            if ours is not None:
                scores[ours] = max(scores.get(ours, 0.0), float(value))
        return scores


class GuardModelClassifier(_HttpClassifier):
    """A guard model behind an OpenAI-compatible chat API; see the module docstring."""

    name = "guard-model"
    default_categories = LLAMA_GUARD_CATEGORIES

    async def score(self, text: str) -> dict[str, float]:
        """1.0 for each category the model names as unsafe, else nothing."""
        data = await self._post("/chat/completions", {
            "model": self.options.model, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": text}],
        })
        try:
            answer = str(data["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"{self.name}: unexpected answer") from None
        verdict, _, codes = answer.partition("\n")
        if verdict.strip().lower() in ("safe", "no"):
            return {}
        if verdict.strip().lower() not in ("unsafe", "yes"):
            raise RuntimeError(f"{self.name}: unexpected verdict {verdict[:40]!r}")
        found = [c.strip() for c in codes.replace(",", " ").split() if c.strip()]
        return {self.categories.get(code, "insult"): 1.0 for code in found or ["?"]}

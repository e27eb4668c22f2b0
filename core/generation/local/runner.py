"""The model step of the sequential scheduler: one request at a time through ``generate``."""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any

from core.generation.base import SamplingParams
from core.generation.local.decoding import TokenSink
from core.generation.local.models import LoadedModel
from core.generation.local.prompt import build_prompt, prompt_budget, transcript_stops
from core.generation.local.repetition import ReplyRepetition
from core.generation.local.ticket import Ticket
from core.generation.reply_shape import reply_limits

log = logging.getLogger(__name__)

MAX_TENANTS_REMEMBERED = 1024  # bots whose last prompt is kept to count shared prefixes


class HFRunner:
    """Runs one job at a time on a transformers model (the model step)."""

    def __init__(self, loaded: LoadedModel, context: int) -> None:
        self.loaded = loaded
        self.context = context
        self.tokens_generated = 0
        # Prompt tokens asked for, and how many of them began like the bot's previous
        # prompt (its persona and instructions: what prefix sharing can compute once).
        self.prompt_tokens = 0
        self.shared_prompt_tokens = 0
        self._last_prompt: dict[str, list[int]] = {}
        self._counting = threading.Lock()

    def count_prompt(self, tenant: str, ids: list[int]) -> None:
        """Count ``ids`` and the prefix they share with ``tenant``'s previous prompt."""
        with self._counting:
            previous = self._last_prompt.pop(tenant, [])
            shared = 0
            for a, b in zip(previous, ids, strict=False):
                if a != b:
                    break
                shared += 1
            self.prompt_tokens += len(ids)
            self.shared_prompt_tokens += shared
            if len(self._last_prompt) >= MAX_TENANTS_REMEMBERED:
                self._last_prompt.pop(next(iter(self._last_prompt)))
            self._last_prompt[tenant] = ids

    def repetition(self, sampling: SamplingParams) -> tuple[float, int]:
        """The request's repetition penalty and no-repeat n-gram size, or the model's."""
        penalty = sampling.repetition_penalty
        ngram = sampling.no_repeat_ngram_size
        if sampling.ignore_eos:  # benchmarks compare like with like: plain decoding
            return 1.0, 0
        return (self.loaded.repetition_penalty if penalty is None else penalty,
                self.loaded.no_repeat_ngram_size if ngram is None else ngram)

    def prepare(self, job: Ticket) -> tuple[list[int], TokenSink]:
        """The prompt ids of ``job`` and the sink its tokens go to (any scheduler's first step)."""
        loaded, sampling = self.loaded, job.request.sampling
        if not (0.0 < sampling.top_p <= 1.0) or sampling.temperature < 0:
            raise ValueError(
                f"invalid sampling: temperature {sampling.temperature}, top_p {sampling.top_p} "
                "(need temperature >= 0 and 0 < top_p <= 1)"
            )
        limit, wrap_up_at = reply_limits(sampling)
        budget = prompt_budget(self.context, limit)
        prompt = build_prompt(loaded.tokenizer, job.request.messages, loaded.prompt_format, budget)
        if prompt.dropped or prompt.truncated:
            log.debug("request %s: dropped %d messages (truncated: %s) to fit %d tokens",
                      job.request.request_id, prompt.dropped, prompt.truncated, budget)
        max_new = max(1, min(limit, self.context - len(prompt.ids)))
        self.count_prompt(job.request.tenant, prompt.ids)
        stops = sampling.stop
        if loaded.prompt_format == "transcript":
            stops += transcript_stops()
        end_ids = loaded.end_token_ids
        if sampling.ignore_eos:
            stops, end_ids = (), ()
        sink = TokenSink(job, loaded.tokenizer, prompt.ids, end_ids, stops, max_new,
                         wrap_up_at=None if sampling.ignore_eos else wrap_up_at,
                         max_sentences=None if sampling.ignore_eos else sampling.max_sentences)
        return prompt.ids, sink

    def run(self, job: Ticket) -> None:
        """Generate ``job``'s reply, emitting deltas as tokens come; raises on failure."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        loaded, sampling = self.loaded, job.request.sampling
        prompt_ids, sink = self.prepare(job)

        def stop_criterion(input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            self.tokens_generated += 1
            done = sink.push(int(input_ids[0, -1]))
            return torch.full(input_ids.shape[:1], done, dtype=torch.bool, device=input_ids.device)

        config = copy.deepcopy(loaded.model.generation_config)
        config.max_new_tokens = sink.max_new_tokens
        # None would fall back to the model's own end token; -1 is no token at all.
        config.eos_token_id = -1 if sampling.ignore_eos else list(loaded.end_token_ids) or None
        config.pad_token_id = loaded.tokenizer.pad_token_id
        if config.pad_token_id is None and loaded.end_token_ids:
            config.pad_token_id = loaded.end_token_ids[0]
        config.do_sample = sampling.temperature > 0
        if config.do_sample:
            config.temperature, config.top_p = sampling.temperature, sampling.top_p
        else:
            config.temperature = config.top_p = config.top_k = None
        # The model's own repetition settings would reach into the prompt; ours do not.
        config.repetition_penalty, config.no_repeat_ngram_size = 1.0, 0
        penalty, ngram = self.repetition(sampling)
        processors = LogitsProcessorList()
        if penalty != 1.0 or ngram > 0:
            processors.append(ReplyRepetition(len(prompt_ids), penalty, ngram))
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=loaded.device)
        with torch.inference_mode():
            loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stop_criterion]),
            )
        sink.finish("length")  # a no-op unless generate stopped on a limit of its own

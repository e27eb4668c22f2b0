"""Per-request sampling for continuous batching that costs O(vocab) per row, not a sort.

transformers' per-request top-k and top-p processors for continuous batching each sort
the whole ``[batch, vocab]`` logits every step. With a 262k-token vocabulary (Gemma 3)
that is ~0.8 s per step at 32 requests on a 2-core CPU — more than the model's forward.
:class:`NucleusSampler` does top-p on the :data:`CANDIDATES` most likely tokens of each
row (a partial selection), with probabilities normalised over the whole vocabulary, so
the nucleus is exact whenever it lies within those candidates (it does for any usual
top-p) and truncated to them otherwise. Greedy is ``top_p = 0``: only the argmax is kept.

It also draws the token itself, from those candidates: the manager's own sampling step
runs ``softmax`` and ``multinomial`` over the whole vocabulary (~35% of a Gemma 3 decode
step on CPU). Its output leaves only the drawn token finite, and the manager's model
runner is switched to taking the argmax (see :func:`sample_in_processor`).

Private names: ``manager.logit_processor``, ``ContinuousBatchingLogitsProcessor`` and
``...ProcessorList`` (``tensors_required``, ``do_processing``,
``_retrieve_processors_kwargs``), ``batch_processor.model_runner.do_sample``. Switched off,
the manager's own per-request temperature and top-p run (a full sort per step).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)

from core.generation.local.hf.patch import Patch
from core.generation.local.hf.repetition import BatchRepetition

CANDIDATES = 256


class NucleusSampler(ContinuousBatchingLogitsProcessor):
    """Top-p with a per-request ``top_p`` (default 1.0: keep every candidate)."""

    supported_kwargs: dict[str, type] = {"top_p": float}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, candidates: int = CANDIDATES) -> None:
        self.candidates = candidates

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        """Rows without a request default to keeping every candidate."""
        int32_tensor.copy_(torch.ones_like(int32_tensor, dtype=torch.float32).view(torch.int32))

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        """Each request's ``top_p``, stored as float32 bits in the int32 argument row."""
        top_ps = [float(r.state.logit_processor_kwargs.get("top_p", 1.0))
                  for r in requests_with_new_token]
        return torch.tensor(top_ps, dtype=torch.float32).view(dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        """Per row, 0 for the token drawn from the nucleus and -inf everywhere else."""
        top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32).unsqueeze(-1)
        if scores.device.type == "cpu" and not bool((top_p > 0).any()):
            # Every row greedy: the runner's argmax is the answer. Only on CPU, where no
            # step is captured into a graph that would keep this branch for good.
            return scores
        values, indices = scores.topk(min(self.candidates, scores.size(-1)), dim=-1)
        probs = (values - scores.logsumexp(dim=-1, keepdim=True)).exp()
        before = probs.cumsum(dim=-1) - probs  # probability mass ranked above each candidate
        keep = before < top_p
        keep[:, 0] = True  # the most likely token always stays (greedy: top_p = 0)
        drawn = torch.multinomial(probs.masked_fill_(~keep, 0.0), num_samples=1)
        # Only the drawn token is finite: the argmax and a draw from the softmax (should
        # the runner still sample, e.g. in a captured CUDA graph) both give it.
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, indices.gather(-1, drawn), 0.0)


def sample_in_processor(batch_processor: Any) -> None:
    """Make the manager's model runner take the argmax of :class:`NucleusSampler`'s output
    instead of sampling the whole vocabulary again."""
    runner = batch_processor.model_runner
    if not hasattr(runner, "do_sample"):  # a transformers that samples differently
        raise RuntimeError("the batching manager's model runner has no do_sample switch")
    runner.do_sample = False


def batch_processors(default_temperature: float) -> ContinuousBatchingLogitsProcessorList:
    """Per-request repetition control (:class:`BatchRepetition`), temperature
    (transformers' own, a division), then :class:`NucleusSampler`."""
    processors = ContinuousBatchingLogitsProcessorList(
        LogitsProcessorList([TemperatureLogitsWarper(default_temperature)]),
        per_request_processors=True,
    )
    # Repetition control first, on the raw logits (as generate() does), then the draw.
    processors.logits_processor.insert(0, BatchRepetition())
    processors.logits_processor.append(NucleusSampler())
    processors.tensors_required += 2  # one argument row per per-request processor
    processors._retrieve_processors_kwargs()
    processors.do_processing = True
    return processors


class CandidateSampler(Patch):
    """Puts :class:`NucleusSampler` in the manager's processor list and makes its model
    runner take the argmax of what it leaves."""

    name = "sampler"
    uses = "manager.logit_processor, model_runner.do_sample, _retrieve_processors_kwargs"

    def __init__(self) -> None:
        self._temperature = 1.0

    def configure(self, generation: dict[str, Any], batching: dict[str, Any]) -> None:
        """Remember the default temperature the processor list is built with."""
        self._temperature = float(generation.get("temperature") or 1.0)

    def before_start(self, manager: Any, model: Any) -> None:
        """Swap the processor list; the batch processor that uses it is built by start()."""
        manager.logit_processor = batch_processors(default_temperature=self._temperature)

    def after_start(self, manager: Any) -> None:
        """Stop the runner from sampling the whole vocabulary again."""
        sample_in_processor(manager.batch_processor)

"""One step through a freshly started batching manager, before it serves anyone.

The seam's patches (``hf/``) rely on transformers internals that change between releases
without notice; what matters is whether the manager still answers correctly with them.
:func:`probe` sends two greedy requests of different lengths and one sampled request
through the manager together (a prefill of packed prompts, then one decode step) and
compares the greedy tokens with the model's own plain forward pass (:class:`Reference`,
computed before any patch touched the model): each must be among the reference's few
most likely tokens, which a broken attention or sampler does not manage.

:func:`open_manager` starts the manager with the patches, probes it, and when that fails
finds the patches that fail on their own and switches them off.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import GenerationError
from core.generation.local.hf.manager import PatchFailed, loop_error
from core.generation.local.hf.patch import Patch

log = logging.getLogger(__name__)

PROBE_TEXTS = ("Hello! How are you today?", "Which opening hours do you have on Sunday?")
PROBE_TOKENS = 2  # the prompt's step and one decode step
TOP = 5  # a greedy token must be among the reference's TOP most likely
PROBE_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class Reference:
    """Per probe prompt: its ids, and per step the greedy token and the TOP most likely."""

    prompts: tuple[tuple[int, ...], ...]
    greedy: tuple[tuple[int, ...], ...]
    likely: tuple[tuple[frozenset[int], ...], ...]
    vocab: int


def reference(model: Any, tokenizer: Any) -> Reference:
    """Greedy steps of the probe prompts by plain forward passes (blocking)."""
    import torch

    prompts, greedy, likely = [], [], []
    vocab = 0
    with torch.inference_mode():
        for text in PROBE_TEXTS:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:32] or [0]
            prompts.append(tuple(ids))
            steps, tops = [], []
            current = list(ids)
            for _ in range(PROBE_TOKENS):
                logits = model(torch.tensor([current], device=model.device)).logits[0, -1]
                vocab = int(logits.shape[-1])
                token = int(logits.argmax())
                steps.append(token)
                tops.append(frozenset(int(i) for i in logits.topk(TOP).indices))
                current.append(token)
            greedy.append(tuple(steps))
            likely.append(tuple(tops))
    return Reference(tuple(prompts), tuple(greedy), tuple(likely), vocab)


async def probe(manager: Any, ref: Reference) -> str | None:
    """Run the probe requests through ``manager``; None if they pass, else what failed."""
    loop = asyncio.get_running_loop()
    tag = os.urandom(4).hex()  # a duplicate request id kills the manager
    waits: dict[str, asyncio.Future[Any]] = {}

    def handler(rid: str) -> Callable[[Any], None]:
        def done(output: Any) -> None:
            if output.is_finished() and not waits[rid].done():
                waits[rid].set_result(output)
        return done

    asks: list[tuple[tuple[int, ...], dict[str, Any]]] = [
        (prompt, {"top_p": 0.0}) for prompt in ref.prompts
    ]
    asks.append((ref.prompts[-1], {"temperature": 1.0, "top_p": 0.9}))
    rids = []
    for i, (prompt, extra) in enumerate(asks):
        rid = f"parley-check-{tag}-{i}"
        waits[rid] = loop.create_future()
        manager.register_result_handler(rid, handler(rid))
        manager.add_request(list(prompt), request_id=rid, max_new_tokens=PROBE_TOKENS,
                            streaming=False, **extra)
        rids.append(rid)
    try:
        outputs = await _gather_or_death(manager, [waits[r] for r in rids])
    except GenerationError as exc:
        return str(exc)
    for output in outputs:
        if getattr(output, "error", None):
            return f"a probe request failed: {output.error}"
        tokens = [int(t) for t in output.generated_tokens]
        if len(tokens) != PROBE_TOKENS or not all(0 <= t < ref.vocab for t in tokens):
            return f"a probe request gave tokens {tokens}"
    for i, output in enumerate(outputs[: len(ref.prompts)]):
        tokens = [int(t) for t in output.generated_tokens]
        for step, token in enumerate(tokens):
            if token not in ref.likely[i][step]:
                return (f"greedy token {token} at step {step} is not among the model's "
                        f"{TOP} most likely ({sorted(ref.likely[i][step])})")
            if token != ref.greedy[i][step]:
                break  # a near-tie went the other way: later steps are not comparable
    return None


async def _gather_or_death(manager: Any, waits: list[asyncio.Future[Any]]) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + PROBE_TIMEOUT
    gathered = asyncio.gather(*waits)
    while True:
        done, _ = await asyncio.wait([gathered], timeout=0.05)
        if done:
            return list(gathered.result())
        if not manager.is_running():
            gathered.cancel()
            raise GenerationError(f"the generation loop died: {loop_error(manager)}")
        if asyncio.get_running_loop().time() > deadline:
            gathered.cancel()
            raise GenerationError(f"the probe got no answer within {PROBE_TIMEOUT:g} s")


StartManager = Callable[[Sequence[Patch]], Awaitable[Any]]
StopManager = Callable[[Any], Awaitable[None]]


@dataclass(slots=True)
class Opened:
    """A manager that passed the probe, the patches it runs with, and those switched off."""

    manager: Any
    patches: list[Patch]
    switched_off: list[tuple[Patch, str]]


async def open_manager(start: StartManager, stop: StopManager, ref: Reference,
                       patches: Sequence[Patch]) -> Opened:
    """Start a manager that passes the probe with as many of ``patches`` as pass it.

    Raises :class:`GenerationError` when even the manager without patches fails.
    """
    off: list[tuple[Patch, str]] = []
    active = list(patches)
    reason = await _try(start, stop, ref, active, off)
    if isinstance(reason, Opened):
        return reason
    if active:
        # Something in the set fails: keep each patch that passes on its own.
        for patch in list(active):
            alone_off: list[tuple[Patch, str]] = []
            alone = await _try(start, stop, ref, [patch], alone_off)
            if isinstance(alone, Opened):
                await stop(alone.manager)
                if alone.patches:
                    continue
            active.remove(patch)
            off.extend(alone_off or [(patch, str(alone))])
        survivors = await _try(start, stop, ref, active, off)
        if isinstance(survivors, Opened):
            return survivors
        off.extend((patch, survivors) for patch in active)
        active = []
        bare = await _try(start, stop, ref, active, off)
        if isinstance(bare, Opened):
            return bare
        reason = bare
    raise GenerationError(f"continuous batching fails its self-check: {reason}")


async def _try(start: StartManager, stop: StopManager, ref: Reference, active: list[Patch],
               off: list[tuple[Patch, str]]) -> Opened | str:
    """Start and probe with ``active``; a patch that raises while starting is moved to ``off``."""
    while True:
        try:
            manager = await start(active)
        except PatchFailed as exc:
            active.remove(exc.patch)
            off.append((exc.patch, str(exc)))
            continue
        except GenerationError as exc:
            return str(exc)
        failed = await probe(manager, ref)
        if failed is None:
            return Opened(manager, active, off)
        await stop(manager)
        return failed

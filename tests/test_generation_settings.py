"""Each generation backend validates its own keys of [generation]."""

from __future__ import annotations

from typing import Any

import pytest

from core.config import parse_settings
from core.errors import ConfigError
from core.generation.base import generator_backends
from core.generation.fleet.settings import inner_settings
from core.generation.local.generator import LocalGenerator


def build(backend: str, **keys: Any) -> Any:
    settings = parse_settings({"bot": {"name": "b"}, "generation": {"backend": backend, **keys}},
                              source="bots/b.toml")
    return generator_backends().get(backend)(settings)


@pytest.mark.parametrize(("backend", "keys", "key"), [
    ("openai", {"url": "http://127.0.0.1:1/v1", "max_batch": 4}, "max_batch"),
    ("echo", {"max_batch": 4}, "max_batch"),
    ("local", {"url": "http://127.0.0.1:1/v1"}, "url"),
    ("local", {"api_key": "k"}, "api_key"),
    ("redis", {"url": "redis://127.0.0.1:1/0", "api_key": "k"}, "api_key"),
])
def test_a_key_of_another_backend_is_an_error_naming_file_and_key(
    backend: str, keys: dict[str, Any], key: str,
) -> None:
    with pytest.raises(ConfigError) as caught:
        build(backend, **keys)
    assert str(caught.value) == (
        f"bots/b.toml: generation.{key}: not a setting of the {backend!r} backend")


@pytest.mark.parametrize(("backend", "key", "expected"), [
    ("local", "temprature", "unknown key (did you mean 'temperature'?)"),
    ("local", "max_new_token", "unknown key (did you mean 'max_new_tokens'?)"),
    ("local", "max_bach", "unknown key (did you mean 'max_batch'?)"),
    ("echo", "zzz", "not a setting of the 'echo' backend"),
])
def test_a_misspelt_key_gets_the_closest_common_or_backend_key(
    backend: str, key: str, expected: str,
) -> None:
    with pytest.raises(ConfigError) as caught:
        build(backend, **{key: 1})
    assert str(caught.value) == f"bots/b.toml: generation.{key}: {expected}"


def test_a_bad_value_names_the_key_and_what_was_expected() -> None:
    with pytest.raises(ConfigError, match=r"^bots/b.toml: generation.max_batch: .*integer"):
        build("local", max_batch="many")


def test_each_backend_reads_its_own_keys() -> None:
    local = build("local", max_batch=3, batching=False, device="cpu")
    assert isinstance(local, LocalGenerator)
    assert (local.options.max_batch, local.options.batching) == (3, False)
    assert build("openai", url="http://127.0.0.1:1/v1", max_retries=0).options.max_retries == 0


def test_a_fleet_file_sizes_its_workers_local_backend() -> None:
    settings = parse_settings({"bot": {"name": "b"}, "generation": {
        "backend": "redis", "url": "redis://127.0.0.1:1/0", "queue": "q", "max_batch": 5},
        "worker": {"backend": "local"}}, source="bots/b.toml")
    generator_backends().get("redis")(settings)  # the front end accepts the workers' keys
    inner = inner_settings(settings)
    assert inner.generation.backend == "local"
    assert LocalGenerator(inner).options.max_batch == 5

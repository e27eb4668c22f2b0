"""Config: typed settings from TOML, secrets from the environment, errors that name file and key."""

from pathlib import Path

import pytest

from core.config import load_settings, parse_settings
from core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bot.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_bots_validate() -> None:
    for path in sorted((REPO / "config").glob("*.toml")):
        env = {"REDIS_URL": "redis://127.0.0.1:1/0", "TELEGRAM_TOKEN": "123:abc",
               "DISCORD_TOKEN": "not-a-real-token"}
        settings = load_settings(path, env=env)
        assert settings.bot.name
        assert settings.source == str(path)


def test_defaults_fill_missing_sections(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[bot]\nname = "a"\n'))
    assert settings.generation.backend == "local"
    assert settings.generation.model == "smollm2-135m"
    assert settings.memory.backend == "embedded"
    assert settings.memory.window == 20


def test_secret_comes_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[bot]\nname = "a"\n[adapters.discord]\ntoken = "${DISCORD_TOKEN}"\n')
    settings = load_settings(path, env={"DISCORD_TOKEN": "s3cret"})
    assert settings.adapters["discord"]["token"] == "s3cret"


def test_missing_secret_names_file_key_and_variable(tmp_path: Path) -> None:
    path = write(tmp_path, '[bot]\nname = "a"\n[adapters.discord]\ntoken = "${DISCORD_TOKEN}"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    message = str(err.value)
    assert str(path) in message
    assert "adapters.discord.token" in message
    assert "DISCORD_TOKEN" in message


@pytest.mark.parametrize(
    ("body", "key", "expected"),
    [
        ('[bot]\nname = "a"\n[memory]\nwindow = "lots"\n', "memory.window", "integer"),
        ('[bot]\nname = "a"\n[memory]\nwindow = 0\n', "memory.window", "greater than or equal"),
        ('[generation]\nmodel = "x"\n', "bot", "required key is missing"),
        ('[bot]\nname = "has spaces"\n', "bot.name", "pattern"),
    ],
)
def test_wrong_value_names_file_and_key(tmp_path: Path, body: str, key: str, expected: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: ")
    assert expected in message


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[bot\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "absent.toml")


def test_parse_settings_is_the_same_validation() -> None:
    with pytest.raises(ConfigError, match=r"<memory>: memory\.ttl"):
        parse_settings({"bot": {"name": "a"}, "memory": {"ttl": -1}})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"generaton": {}}, "<memory>: generaton: unknown key (did you mean 'generation'?)"),
        ({"moderation": {"channels": {"console": {"input_filter": []}}}},
         "moderation.channels.console.input_filter: unknown key "
         "(did you mean 'input_filters'?)"),
        ({"memory": {"zzz": 1}}, "<memory>: memory.zzz: unknown key"),
    ],
)
def test_unknown_key_suggests_the_closest(raw: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings({"bot": {"name": "a"}, **raw})
    assert expected in str(err.value)
    if "did you mean" not in expected:
        assert "did you mean" not in str(err.value)


def test_a_table_validated_on_its_own_suggests_too() -> None:
    from bots.console import ConsoleSettings
    from core.config import validate_section

    with pytest.raises(ConfigError, match=r"x\.toml: adapters\.console\.promt: unknown key "
                                          r"\(did you mean 'prompt'\?\)"):
        validate_section(ConsoleSettings, {"promt": "> "}, source="x.toml",
                         prefix="adapters.console")


def test_unknown_backend_suggests_the_closest() -> None:
    from core.memory.base import memory_backends

    with pytest.raises(ConfigError, match=r"unknown memory backend 'reddis' "
                                          r"\(did you mean 'redis'\?\) \(known: "):
        memory_backends().get("reddis", where="x.toml: memory.backend")


def test_worker_url_follows_the_generation_redis() -> None:
    shared = parse_settings({"bot": {"name": "a"}, "generation": {
        "backend": "redis", "url": "redis://10.0.0.7:6380/2"}})
    assert shared.worker.url == "redis://10.0.0.7:6380/2"
    told = parse_settings({"bot": {"name": "a"}, "worker": {"url": "redis://w:1/0"},
                           "generation": {"backend": "redis", "url": "redis://g:1/0"}})
    assert told.worker.url == "redis://w:1/0"
    local = parse_settings({"bot": {"name": "a"}, "generation": {"url": "redis://g:1/0"}})
    assert local.worker.url == "redis://127.0.0.1:6379/0"

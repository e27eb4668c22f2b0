"""The ``parley`` command as a user runs it: a real subprocess, stdin in, stdout out."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def parley(
    *args: str, stdin: bytes = b"", timeout: float = 600
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        input=stdin, capture_output=True, timeout=timeout, cwd=REPO, env=env, check=False,
    )


def bot_file(tmp_path: Path, generation: str, name: str = "clibot") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[bot]\nname = "{name}"\npersona = "You are a friendly assistant."\n'
        f"[generation]\n{generation}\n"
        '[memory]\nbackend = "embedded"\n[adapters.console]\n',
        encoding="utf-8",
    )
    return path


def json_lines(out: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


EXAMPLES = ("demo.toml", "echo.toml")


@pytest.fixture
def example_ports_taken() -> Iterator[list[int]]:
    """The example bots' fixed ports (8080, 8081) taken, as by ``scripts/demo`` running
    beside the tests; a port something else already holds is taken just the same."""
    from core.config import load_settings

    ports = sorted({int(web["port"]) for name in EXAMPLES
                    for web in [load_settings(REPO / "config" / name).adapters["web"]]})
    with contextlib.ExitStack() as stack:
        for port in ports:
            holder = stack.enter_context(socket.socket())
            try:
                holder.bind(("127.0.0.1", port))
                holder.listen()
            except OSError:
                pass  # taken already
        yield ports


def test_check_accepts_the_example_bots(example_ports_taken: list[int]) -> None:
    """Whatever else listens on this machine: the files are checked, not the ports."""
    for name in EXAMPLES:
        result = parley("check", "--no-ports", f"config/{name}")
        assert result.returncode == 0, result.stderr.decode()
        assert b": ok" in result.stdout
    # Without --no-ports the same check is about this machine now, and says so.
    result = parley("check", "config/demo.toml")
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{example_ports_taken[0]}" in result.stderr.decode()


def test_check_rejects_a_wrong_file_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[bot]\nname = "x"\n[memory]\nwindow = "many"\n', encoding="utf-8")
    result = parley("check", str(path))
    assert result.returncode == 2
    err = result.stderr.decode()
    assert f"{path}: memory.window:" in err
    assert "Traceback" not in err


def test_check_rejects_unknown_backend(tmp_path: Path) -> None:
    path = bot_file(tmp_path, 'backend = "nonesuch"')
    result = parley("check", str(path))
    assert result.returncode == 2
    assert "generation.backend: unknown generation backend 'nonesuch'" in result.stderr.decode()


def test_chat_json_one_object_per_line(tmp_path: Path) -> None:
    path = bot_file(tmp_path, 'backend = "echo"')
    lines = "hello world\n/help\n\nbad \x01 char\nsecond message\n/reset\n"
    result = parley("chat", str(path), "--json", stdin=lines.encode() + b"\xff\xfe broken\n")
    assert result.returncode == 0, result.stderr.decode()
    replies = json_lines(result.stdout)
    assert [r["text"] for r in replies][:1] == ["hello world"]
    assert [(r["kind"], r["action"]) for r in replies[:2]] == [("final", "allow"),
                                                              ("notice", "allow")]
    assert "/reset" in str(replies[1]["text"])
    assert (replies[2]["kind"], replies[2]["code"]) == ("error", "invalid_input")  # empty line
    assert replies[3]["code"] == "invalid_input" and "control" in str(replies[3]["text"])
    assert replies[4]["text"] == "second message"
    assert replies[5]["kind"] == "notice"
    assert replies[6]["code"] == "invalid_input" and "UTF-8" in str(replies[6]["text"])
    assert len(replies) == 7


def test_chat_plain_text_mode(tmp_path: Path) -> None:
    path = bot_file(tmp_path, 'backend = "echo"')
    result = parley("chat", str(path), stdin=b"one\ntwo\n")
    assert result.stdout.decode().splitlines() == ["one", "two"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["smollm2-135m", "gemma3-270m"])
def test_chat_with_each_preset_gives_a_real_reply(tmp_path: Path, preset: str) -> None:
    path = bot_file(tmp_path, f'model = "{preset}"\nmax_new_tokens = 32\ntemperature = 0.0')
    result = parley("chat", str(path), "--json",
                    stdin=b"Hello, who are you?\nWhat did I just ask you?\n")
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    replies = json_lines(result.stdout)
    assert len(replies) == 2
    for reply in replies:
        assert reply["kind"] == "final", reply
        assert reply["action"] == "allow"
        assert isinstance(reply["text"], str) and reply["text"].strip()


def test_a_failed_start_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "unreachable.toml"
    path.write_text('[bot]\nname = "x"\n[generation]\nbackend = "echo"\n'
                    '[memory]\nbackend = "redis"\nurl = "redis://127.0.0.1:1/0"\n'
                    '[adapters.console]\n', encoding="utf-8")
    result = parley("chat", str(path), stdin=b"hello\n", timeout=60)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "redis at redis://127.0.0.1:1/0" in err
    assert "Traceback" not in err


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_check_reports_a_port_in_use(tmp_path: Path, taken_port: int) -> None:
    path = bot_file(tmp_path, 'backend = "echo"')
    path.write_text(path.read_text() + f'[adapters.web]\nport = {taken_port}\n')
    result = parley("check", str(path), timeout=120)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert f"{path}: adapters.web: cannot listen on 127.0.0.1:{taken_port}: " in err
    assert "in use" in err and "Traceback" not in err


def test_run_checks_ports_before_loading_the_model(tmp_path: Path, taken_port: int) -> None:
    path = bot_file(tmp_path, 'model = "smollm2-135m"')
    path.write_text(path.read_text() + f'[adapters.web]\nport = {taken_port}\n')
    result = parley("run", str(path), "--adapter", "web", timeout=120)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert f"adapters.web: cannot listen on 127.0.0.1:{taken_port}" in err
    assert "loaded model" not in err and "converting" not in err


def test_the_suite_keeps_converted_models_out_of_the_users_cache() -> None:
    from core.generation.local.models import cache_dir
    from tests.support.model_cache import suite_cache_dir

    ours = cache_dir(None)
    assert ours == suite_cache_dir(os.environ)
    assert os.environ.get("PARLEY_TEST_CACHE_DIR") or ours == REPO / ".parley-cache" / "models"
    assert not ours.is_relative_to(Path.home() / ".cache")
    show = "import os; print(os.environ['PARLEY_CACHE_DIR'])"
    seen = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True,
                          check=True)
    assert seen.stdout.strip() == str(ours)  # every `parley` a test starts inherits it


def test_check_names_a_misspelt_preset_and_the_closest_one(tmp_path: Path) -> None:
    result = parley("check", str(bot_file(tmp_path, 'model = "smolm2-135m"')), timeout=120)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert "generation.model: unknown model preset 'smolm2-135m' (did you mean " \
           "'smollm2-135m'?)" in err
    assert "gemma3-270m" in err and "Traceback" not in err


def test_check_accepts_a_hugging_face_id_with_a_note(tmp_path: Path) -> None:
    path = bot_file(tmp_path, 'model = "HuggingFaceTB/SmolLM2-360M-Instruct"')
    result = parley("check", str(path), timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert b"is a Hugging Face model id" in result.stderr

"""The widget's server side over real HTTP and WebSockets on loopback: sessions, origins,
tokens, conversation ownership, frame limits, rates, resume and feedback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from bots.web.adapter import WebAdapter
from bots.web.routes import HUB
from bots.web.sessions import SessionSigner, sign_identity
from core.errors import ConfigError
from tests.support.widget import (
    BOT,
    SECRET,
    GatedEcho,
    final_of,
    frames_until,
    gated_engine,
    serving,
    shown,
    widget_settings,
)


def events(frames: list[dict[str, Any]], message_id: str) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("type") == "event" and f.get("message_id") == message_id]


async def opened(site: Any, token: str, after: int = 0,
                 caught_up: list[dict[str, Any]] | None = None) -> Any:
    """An open socket that has resumed after ``after``; the catch-up's frames go into
    ``caught_up``."""
    ws = await site.socket(token).__aenter__()
    await ws.send_json({"type": "resume", "after": after})
    frames = await frames_until(ws, lambda f: f["type"] == "resumed")
    if caught_up is not None:
        caught_up += frames
    return ws


async def test_message_streams_numbered_events_and_is_remembered() -> None:
    async with serving(gated_engine(widget_settings(), GatedEcho())) as site:
        session = await site.session()
        assert session["status"] == 200 and session["theme"]["title"]
        async with site.socket(session["token"]) as ws:
            assert ws.protocol == "parley.v1"
            await ws.send_json({"type": "resume", "after": 0})
            start = await frames_until(ws, lambda f: f["type"] == "resumed")
            assert [f["type"] for f in start] == ["ready", "history", "resumed"]
            assert start[1]["turns"] == []
            await ws.send_json({"type": "message", "id": "m1", "text": "hello **there** you"})
            got = events(await frames_until(ws, final_of("m1")), "m1")
        kinds = [e["kind"] for e in got]
        assert kinds[0] == "user" and kinds[-1] == "final"
        assert shown(got[1:]) == "hello **there** you"
        seqs = [e["seq"] for e in got]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one each, in order
        # A new socket (a page load) gets the conversation back from memory.
        ws = await site.socket(session["token"]).__aenter__()
        await ws.send_json({"type": "resume", "after": 0})
        history = next(f for f in await frames_until(ws, lambda f: f["type"] == "resumed")
                       if f["type"] == "history")
        await ws.close()
        assert history["turns"] == [
            {"role": "user", "text": "hello **there** you", "message_id": "m1"},
            {"role": "assistant", "text": "hello **there** you", "message_id": "m1"},
        ]


async def test_frames_are_not_deflated_even_when_the_browser_offers_it() -> None:
    async with serving(gated_engine(widget_settings(), GatedEcho())) as site:
        token = (await site.session())["token"]
        # compress=15: "permessage-deflate; client_max_window_bits", as browsers offer.
        async with site.socket(token, compress=15) as ws:
            assert (await ws.receive_json())["type"] == "ready"
            assert ws.compress == 0  # declined: small frames cost more to deflate


async def test_handshake_and_session_refuse_origins_not_allowed() -> None:
    async with serving(gated_engine(widget_settings(), GatedEcho())) as site:
        refused = await site.session(origin="http://evil.test")
        assert refused["status"] == 403 and refused["code"] == "forbidden_origin"
        token = (await site.session())["token"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            async with site.socket(token, origin="http://evil.test"):
                pass
        assert caught.value.status == 403
        async with site.socket(token) as ws:  # the same token from the allowed origin
            assert (await ws.receive_json())["type"] == "ready"


async def test_missing_expired_and_forged_tokens_are_refused() -> None:
    async with serving(gated_engine(widget_settings(), GatedEcho())) as site:
        good = (await site.session())["token"]
        body, mac = good.split(".")
        past = SessionSigner(BOT, SECRET, ttl=60, clock=lambda: 1_000_000.0)
        other_key = SessionSigner(BOT, "another-secret-0123456789", ttl=60)
        other_bot = SessionSigner("otherbot", SECRET, ttl=60)
        cases = {
            None: "missing_token",
            "": "missing_token",
            past.sign(past.anonymous()): "expired_token",
            other_key.sign(other_key.anonymous()): "bad_token",
            other_bot.sign(other_bot.anonymous()): "bad_token",
            # The claims of one token with the signature of another.
            other_key.sign(other_key.anonymous()).split(".")[0] + "." + mac: "bad_token",
            body + "." + mac[:-2] + ("AA" if not mac.endswith("AA") else "BB"): "bad_token",
            "not-a-token": "bad_token",
        }
        for token, code in cases.items():
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                async with site.socket(token):
                    pass
            assert caught.value.status == 401, token
            async with site.http.get(site.url + "/api/v1/feedback",
                                     headers={"Authorization": f"Bearer {token or ''}"}) as r:
                assert r.status == 401 and (await r.json())["code"] == code, token


async def test_a_session_cannot_touch_another_sessions_conversation() -> None:
    async with serving(gated_engine(widget_settings(), GatedEcho())) as site:
        alice, bob = await site.session(), await site.session()
        assert alice["conversation_id"] != bob["conversation_id"]
        ws_bob = await opened(site, bob["token"])
        await ws_bob.send_json({"type": "message", "id": "b1", "text": "bob's secret"})
        await frames_until(ws_bob, final_of("b1"))
        ws_alice = await opened(site, alice["token"])
        theirs = bob["conversation_id"]
        await ws_alice.send_json({"type": "message", "id": "a1", "text": "/reset",
                                  "conversation_id": theirs})
        refused = await frames_until(ws_alice, lambda f: f["type"] == "error")
        assert refused[-1]["code"] == "forbidden" and refused[-1]["id"] == "a1"
        # Alice's own page load shows nothing of Bob's.
        ws = await site.socket(alice["token"]).__aenter__()
        await ws.send_json({"type": "resume", "after": 0, "conversation_id": theirs})
        assert (await frames_until(ws, lambda f: f["type"] == "error"))[-1]["code"] == "forbidden"
        await ws.close()
        ws = await opened(site, alice["token"])
        await ws.send_json({"type": "ping"})
        seen = await frames_until(ws, lambda f: f["type"] == "pong")
        assert not any("secret" in json.dumps(f) for f in seen)
        # Bob's conversation is untouched: no reset, nothing of Alice's reached his socket.
        await ws_bob.send_json({"type": "ping"})
        assert [f["type"] for f in await frames_until(ws_bob, lambda f: f["type"] == "pong")] \
            == ["pong"]
        for sock in (ws, ws_alice, ws_bob):
            await sock.close()
        ws = await site.socket(bob["token"]).__aenter__()
        await ws.send_json({"type": "resume", "after": 0})
        history = (await frames_until(ws, lambda f: f["type"] == "history"))[-1]
        await ws.close()
        assert [t["text"] for t in history["turns"]] == ["bob's secret", "bob's secret"]


async def test_oversized_frame_closes_the_socket_with_1009() -> None:
    async with serving(gated_engine(widget_settings(), GatedEcho()),
                       {"max_frame_bytes": 2048}) as site:
        token = (await site.session())["token"]
        async with site.socket(token) as ws:
            await ws.receive_json()  # ready
            await ws.send_str(json.dumps({"type": "message", "id": "big", "text": "x" * 4000}))
            async with asyncio.timeout(5):
                while (message := await ws.receive()).type is not aiohttp.WSMsgType.CLOSE:
                    pass
            assert message.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        assert site.engine.metrics.messages.labels(BOT, "web", "answered")._value.get() == 0
        # A frame just under the cap is fine.
        async with site.socket(token) as ws:
            await ws.send_json({"type": "resume", "after": 0})
            await ws.send_json({"type": "message", "id": "ok", "text": "y " * 500})
            assert (await frames_until(ws, final_of("ok")))[-1]["kind"] == "final"


async def test_a_flooding_session_is_limited_while_another_is_not() -> None:
    section = {"session_rate": 3, "rate_window": 60, "ip_rate": 1000}
    async with serving(gated_engine(widget_settings(), GatedEcho()), section) as site:
        flood, calm = await site.session(), await site.session()
        ws = await opened(site, flood["token"])
        for i in range(10):
            await ws.send_json({"type": "message", "id": f"f{i}", "text": f"spam {i}"})
        await ws.send_json({"type": "ping"})
        got = await frames_until(ws, lambda f: f["type"] == "pong")
        limited = [f for f in got if f["type"] == "error"]
        assert [f["id"] for f in limited] == [f"f{i}" for i in range(3, 10)]
        assert all(f["code"] == "rate_limited" and f["retry_after"] > 0 for f in limited)
        other = await opened(site, calm["token"])
        await other.send_json({"type": "message", "id": "c1", "text": "hello"})
        assert (await frames_until(other, final_of("c1")))[-1]["kind"] == "final"
        await ws.close()
        await other.close()


async def test_the_heartbeat_reaps_a_socket_that_stopped_answering() -> None:
    async with serving(gated_engine(widget_settings(), GatedEcho()), {"heartbeat": 1}) as site:
        token = (await site.session())["token"]
        assert site.adapter._runner is not None
        hub = site.adapter._runner.app[HUB]
        async with site.socket(token, autoping=False) as ws:  # never answers pings
            await ws.receive_json()
            assert sum(hub.sockets.values()) == 1
            async with asyncio.timeout(6):
                while (await ws.receive()).type not in (aiohttp.WSMsgType.CLOSE,
                                                        aiohttp.WSMsgType.CLOSED):
                    pass
        for _ in range(50):
            if not hub.sockets:
                break
            await asyncio.sleep(0.05)
        assert not hub.sockets


async def test_reconnect_continues_an_in_flight_reply_once() -> None:
    generator = GatedEcho(before=3)
    async with serving(gated_engine(widget_settings(), generator)) as site:
        token = (await site.session())["token"]
        ws = await opened(site, token)
        text = "SLOW one two three four five six"
        await ws.send_json({"type": "message", "id": "r1", "text": text})
        await generator.holding.wait()
        seen: list[dict[str, Any]] = []  # until the held reply's words so far are shown
        first = await frames_until(
            ws, lambda f: bool(seen.append(f)) or shown(events(seen, "r1")).endswith("two"))
        await ws.close()  # the network blips
        generator.gate.set()  # the reply goes on with nobody listening
        await asyncio.sleep(0.1)
        last = max(f["seq"] for f in first if "seq" in f)
        rest: list[dict[str, Any]] = []
        ws = await opened(site, token, after=last, caught_up=rest)
        await ws.send_json({"type": "ping"})
        rest += await frames_until(ws, lambda f: f["type"] == "pong")
        await ws.close()
        got = events(first, "r1") + events(rest, "r1")
        seqs = [e["seq"] for e in got]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # nothing missing or twice
        # What the widget showed before the blip is shown on, and the answer ends it.
        assert shown(got[1:]) == text
        assert got[-1]["kind"] == "final" and got[-1]["text"] == text


async def test_redis_resume_continues_on_another_front_end(redis_url: str,
                                                           memory_prefix: str) -> None:
    memory = {"backend": "redis", "url": redis_url, "key_prefix": memory_prefix}
    generator = GatedEcho(before=2)
    async with serving(gated_engine(widget_settings(memory), generator)) as one, \
            serving(gated_engine(widget_settings(memory), GatedEcho())) as two:
        token = (await one.session())["token"]
        ws = await opened(one, token)
        await ws.send_json({"type": "message", "id": "x1", "text": "SLOW alpha beta gamma"})
        await generator.holding.wait()
        first = await frames_until(ws, lambda f: f.get("kind") == "delta")
        await ws.close()
        # The page comes back through the other front end while the reply is held.
        rest: list[dict[str, Any]] = []
        ws = await opened(two, token, after=max(f["seq"] for f in first if "seq" in f),
                          caught_up=rest)
        generator.gate.set()  # the rest arrives live, through Redis pub/sub
        rest += await frames_until(ws, final_of("x1"))
        await ws.close()
        got = events(first, "x1") + events(rest, "x1")
        seqs = [e["seq"] for e in got]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert shown(got[1:]) == "SLOW alpha beta gamma" and got[-1]["kind"] == "final"


async def test_feedback_is_stored_with_the_turn_and_listed(redis_url: str,
                                                           memory_prefix: str) -> None:
    memory = {"backend": "redis", "url": redis_url, "key_prefix": memory_prefix}
    async with serving(gated_engine(widget_settings(memory), GatedEcho())) as site:
        session = await site.session()
        ws = await opened(site, session["token"])
        await ws.send_json({"type": "message", "id": "q1", "text": "what is two plus two"})
        await frames_until(ws, final_of("q1"))
        await ws.send_json({"type": "feedback", "message_id": "q1", "rating": "down",
                            "comment": "not an answer"})
        assert (await frames_until(ws, lambda f: f["type"] != "event"))[-1] == {
            "type": "feedback_saved", "message_id": "q1"}
        await ws.send_json({"type": "feedback", "message_id": "nope", "rating": "up"})
        assert (await frames_until(ws, lambda f: f["type"] != "event"))[-1]["code"] == \
            "unknown_message"
        await ws.close()
        async with site.http.get(site.url + "/api/v1/feedback", headers={
                "Authorization": f"Bearer {session['token']}"}) as response:
            listed = await response.json()
        other = await site.session()
        async with site.http.get(site.url + "/api/v1/feedback", headers={
                "Authorization": f"Bearer {other['token']}"}) as response:
            assert (await response.json())["feedback"] == []
    [record] = listed["feedback"]
    assert record["message_id"] == "q1" and record["rating"] == "down"
    assert record["comment"] == "not an answer"
    assert record["prompt"] == record["reply"] == "what is two plus two"


async def test_site_signed_identity_keeps_one_conversation_across_devices() -> None:
    async with serving(gated_engine(widget_settings(), GatedEcho())) as site:
        identity = {"user_id": "customer-42", "signature": sign_identity(SECRET, "customer-42")}
        laptop = await site.session({"identity": identity})
        phone = await site.session({"identity": identity})
        assert laptop["verified"] and laptop["conversation_id"] == phone["conversation_id"]
        ws = await opened(site, laptop["token"])
        await ws.send_json({"type": "message", "id": "l1", "text": "from my laptop"})
        await frames_until(ws, final_of("l1"))
        await ws.close()
        ws = await site.socket(phone["token"]).__aenter__()
        await ws.send_json({"type": "resume", "after": 0})
        history = (await frames_until(ws, lambda f: f["type"] == "history"))[-1]
        await ws.close()
        assert history["turns"][0]["text"] == "from my laptop"
        forged = await site.session({"identity": {**identity, "user_id": "customer-43"}})
        assert forged["status"] == 403 and forged["code"] == "bad_identity"
        anonymous = await site.session()
        assert not anonymous["verified"]
        assert anonymous["conversation_id"] != laptop["conversation_id"]
        # A renewed token keeps its conversation.
        renewed = await site.session({"token": anonymous["token"]})
        assert renewed["conversation_id"] == anonymous["conversation_id"]


async def test_sse_stream_sends_keep_alive_comments_while_the_reply_waits() -> None:
    generator = GatedEcho(before=0)  # held before its first word, as in a long queue
    async with serving(gated_engine(widget_settings(), generator), {"keepalive": 0.2}) as site:
        body = {"conversation_id": "k1", "user_id": "u1", "text": "SLOW queued words"}
        async with site.http.post(site.url + "/api/v1/chat/stream", json=body) as response:
            await generator.holding.wait()
            waited = b""
            async with asyncio.timeout(5):
                while waited.count(b": keep-alive\n\n") < 3:
                    waited += await response.content.readany()
            assert response.status == 200
            assert b"event:" not in waited  # nothing but comments so far
            generator.gate.set()
            rest = (await response.content.read()).decode()
        blocks = [b for b in rest.split("\n\n") if b.strip() and not b.startswith(":")]
        assert blocks[-1].startswith("event: final")
        assert json.loads(blocks[-1].split("data: ", 1)[1])["text"] == "SLOW queued words"
        # A reply that starts at once has no comment in it.
        body = {"conversation_id": "k2", "user_id": "u1", "text": "quick"}
        async with site.http.post(site.url + "/api/v1/chat/stream", json=body) as response:
            assert b"keep-alive" not in await response.read()


@pytest.mark.parametrize(("section", "key"), [
    ({"theme": {"accent": "red;background:url(x)"}}, "adapters.web.theme.accent"),
    ({"allowed_origins": ["shop.example"]}, "adapters.web.allowed_origins"),
    ({"secret": "short"}, "adapters.web.secret"),
    ({"theme": {"mode": "purple"}}, "adapters.web.theme.mode"),
])
def test_widget_config_errors_name_the_file_and_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config/widgettest.toml: {key}"):
        WebAdapter(widget_settings(), section)


class Crashing(GatedEcho):
    """A generator with a bug: raises what no part of Parley expects."""

    async def stream(self, request: Any) -> Any:  # type: ignore[override]
        raise RuntimeError("a bug")
        yield


async def test_a_crash_behind_the_engine_is_an_apology_a_log_line_and_a_metric(
        caplog: pytest.LogCaptureFixture) -> None:
    async with serving(gated_engine(widget_settings(), Crashing())) as site:
        ws = await opened(site, (await site.session())["token"])
        await ws.send_json({"type": "message", "id": "boom", "text": "hello"})
        got = events(await frames_until(ws, final_of("boom")), "boom")
        await ws.close()
        errors = site.engine.metrics.errors.labels(BOT, "web_reply")._value.get()
    assert [e["kind"] for e in got] == ["user", "typing", "error"]
    assert got[-1]["code"] == "internal" and got[-1]["text"] == site.engine.apologies.internal
    assert errors == 1
    assert any("reply to web:" in r.getMessage() for r in caplog.records)


@asynccontextmanager
async def _on_redis(redis_server: Any, memory_prefix: str) -> AsyncIterator[tuple[Any, str]]:
    """The widget's bot on a (re)started redis-server with short timeouts, and a session."""
    redis_server.start()
    memory = {"backend": "redis", "url": redis_server.url, "key_prefix": memory_prefix,
              "timeout": 0.5}
    async with serving(gated_engine(widget_settings(memory), GatedEcho())) as site:
        yield site, (await site.session())["token"]


async def test_redis_down_mid_conversation_tells_the_socket_and_recovers(
        redis_server: Any, memory_prefix: str) -> None:
    async with _on_redis(redis_server, memory_prefix) as (site, token):
        ws = await opened(site, token)
        redis_server.kill()
        try:
            await ws.send_json({"type": "message", "id": "lost", "text": "hello?"})
            told = (await frames_until(ws, final_of("lost")))[-1]
        finally:
            redis_server.restart()
        assert told["kind"] == "error" and told["code"] == "unavailable"
        assert "seq" not in told  # not kept: the log could not be written
        assert site.engine.metrics.errors.labels(BOT, "web_store")._value.get() == 1
        # Once Redis is back the conversation goes on.
        await ws.send_json({"type": "message", "id": "back", "text": "hello again"})
        assert (await frames_until(ws, final_of("back")))[-1]["kind"] == "final"
        await ws.close()


async def test_one_address_flooding_with_many_sessions_is_limited() -> None:
    section = {"session_rate": 100, "ip_rate": 9, "rate_window": 60}
    async with serving(gated_engine(widget_settings(), GatedEcho()), section) as site:
        sockets = []
        for _ in range(3):  # a new session per message does not get around it
            sockets.append(await opened(site, (await site.session())["token"]))
        refused = []
        for i in range(6):
            ws = sockets[i % 3]
            await ws.send_json({"type": "message", "id": f"n{i}", "text": "hi"})
            got = await frames_until(ws, lambda f: f["type"] == "error" or (
                f["type"] == "event" and f["kind"] == "final"))
            refused += [f["id"] for f in got if f["type"] == "error"]
        for ws in sockets:
            await ws.close()
    # Three session requests, three resumes and the first three messages fit into nine.
    assert refused == ["n3", "n4", "n5"]


async def test_sockets_per_address_are_capped() -> None:
    async with serving(gated_engine(widget_settings(), GatedEcho()),
                       {"max_sockets_per_ip": 2}) as site:
        token = (await site.session())["token"]
        first, second = site.socket(token), site.socket(token)
        async with first, second:
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                async with site.socket(token):
                    pass
            assert caught.value.status == 429
        async with site.socket(token) as ws:  # once they are closed, there is room again
            assert (await ws.receive_json())["type"] == "ready"


async def test_resuming_past_what_is_kept_sends_the_whole_conversation_again() -> None:
    async with serving(gated_engine(widget_settings(), GatedEcho()),
                       {"resume_events": 16}) as site:
        token = (await site.session())["token"]
        ws = await opened(site, token)
        await ws.send_json({"type": "message", "id": "old", "text": "the first words"})
        first = await frames_until(ws, final_of("old"))
        seen = first[0]["seq"]  # the widget saw only the first event, then went away
        for i in range(8):  # enough events to push the first ones out of the log
            await ws.send_json({"type": "message", "id": f"n{i}", "text": f"more words {i}"})
            await frames_until(ws, final_of(f"n{i}"))
        await ws.close()
        caught: list[dict[str, Any]] = []
        ws = await opened(site, token, after=seen, caught_up=caught)
        await ws.close()
    [history] = [f for f in caught if f["type"] == "history"]
    assert [t["text"] for t in history["turns"]][:2] == ["the first words"] * 2
    assert len(history["turns"]) == 18 and history["in_flight"] == []
    assert not [f for f in caught if f["type"] == "event"]  # nothing beside the history


async def test_a_resume_while_redis_is_down_closes_the_socket_to_be_tried_again(
        redis_server: Any, memory_prefix: str) -> None:
    async with _on_redis(redis_server, memory_prefix) as (site, token):
        redis_server.kill()
        try:
            async with site.socket(token) as ws:
                await ws.send_json({"type": "resume", "after": 0})
                frames = []
                async with asyncio.timeout(10):
                    while (message := await ws.receive()).type is aiohttp.WSMsgType.TEXT:
                        frames.append(json.loads(message.data))
                assert message.data == aiohttp.WSCloseCode.TRY_AGAIN_LATER
        finally:
            redis_server.restart()
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "unavailable"
        ws = await opened(site, token)  # and once Redis is back, it works
        await ws.close()


async def test_in_bot_forget_reaches_the_widgets_log_and_feedback() -> None:
    """The adapter registers the hub's forget hook when it starts: ``/forget`` (the
    registry's ``forget_user``) empties the reply log and the feedback, in process too."""
    async with serving(gated_engine(widget_settings(), GatedEcho())) as site:
        session = await site.session()
        ws = await opened(site, session["token"])
        await ws.send_json({"type": "message", "id": "m1", "text": "remember me"})
        await frames_until(ws, final_of("m1"))
        await ws.send_json({"type": "feedback", "message_id": "m1", "rating": "up"})
        await frames_until(ws, lambda f: f["type"] == "feedback_saved")
        await ws.close()
        hub = site.adapter._runner.app[HUB]  # type: ignore[union-attr]
        user = SessionSigner(BOT, SECRET, ttl=60).verify(session["token"])
        ref = hub.ref(user)
        assert (await hub.log.since(ref, 0)).entries and await hub.feedback.list(ref)
        counts = await site.engine.plugins.forget_user_by_store("web", user.user_id)
        assert counts["adapters.web"] == 2 and counts["memory"] >= 1
        assert (await hub.log.since(ref, 0)).entries == []
        assert await hub.feedback.list(ref) == []

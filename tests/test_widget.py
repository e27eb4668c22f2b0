"""The widget in a real browser: Debian's headless Chromium driven by playwright.

The widget is embedded with its one script tag in a page served from another loopback
origin (the way a customer's site uses it), talks to a real web adapter with the echo
generator, and is checked where users see it: the DOM inside its shadow root.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bots.web.sessions import Session, SessionSigner
from core.types import ConversationKey
from tests.support.widget import (
    BOT,
    SECRET,
    GatedEcho,
    Served,
    gated_engine,
    serving,
    widget_settings,
)
from tests.support.xss import PAYLOADS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DOCS = Path(__file__).resolve().parent.parent / "docs"

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="Debian's chromium is not installed (scripts/setup dev installs it)",
)

# What the page reports about the widget; everything lives in its open shadow root.
_STATE = """() => {
  const root = document.getElementById('parley-widget')?.shadowRoot;
  if (!root) return null;
  return [...root.querySelectorAll('.msg[data-mid]')].map((m) => ({
    role: m.dataset.role, mid: m.dataset.mid, state: m.dataset.state || '',
    text: m.querySelector('.body').textContent }));
}"""


@dataclass
class Page:
    """A host page with the widget on it, in a browser tab."""

    tab: Any
    site: Served
    url: str

    async def messages(self) -> list[dict[str, str]]:
        return list(await self.tab.evaluate(_STATE) or [])

    async def bot_replies(self) -> list[dict[str, str]]:
        return [m for m in await self.messages() if m["role"] == "bot"]

    async def open(self) -> None:
        await self.tab.locator("#parley-widget .launcher").click()
        await self.tab.locator("#parley-widget .input").wait_for(state="visible")

    async def say(self, text: str) -> None:
        await self.tab.locator("#parley-widget .input").fill(text)
        await self.tab.locator("#parley-widget .input").press("Enter")

    async def wait_for(self, check: Any, seconds: float = 15.0) -> list[dict[str, str]]:
        """Poll the widget's messages until ``check(messages)`` holds."""
        async with asyncio.timeout(seconds):
            while True:
                shown = await self.messages()
                if check(shown):
                    return shown
                await asyncio.sleep(0.05)


@asynccontextmanager
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as driver:
        chromium = await driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@asynccontextmanager
async def host_page(html: str) -> AsyncIterator[str]:
    """A customer's site: another origin on loopback, serving ``html`` at ``/``
    (``{bot}`` in it becomes the bot server's URL once that is known)."""
    holder: dict[str, str] = {}

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=html.replace("{bot}", holder["bot"]), content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        holder["origin"] = f"http://127.0.0.1:{port}"
        yield holder  # type: ignore[misc]
    finally:
        await runner.cleanup()


SNIPPET = '<script src="{bot}/widget.js" data-bot="widgettest" async></script>'
SHOP = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Example Shop</title>
</head><body style="font-family: sans-serif; margin: 2rem; background: #fafaf9">
<h1>Example Shop</h1><p>Any page of a customer's site; the chat is one script tag.</p>
""" + SNIPPET + "</body></html>"


@asynccontextmanager
async def embedded(generator: GatedEcho, section: dict[str, Any] | None = None,
                   html: str = SHOP) -> AsyncIterator[Page]:
    async with host_page(html) as holder, serving(
        gated_engine(widget_settings(), generator),
        {"session_rate": 1000, "ip_rate": 10_000, **(section or {})},
        origin=holder["origin"],  # type: ignore[index]
    ) as site, browser() as chromium:
        holder["bot"] = site.url  # type: ignore[index]
        context = await chromium.new_context(viewport={"width": 1000, "height": 720})
        tab = await context.new_page()
        url = holder["origin"] + "/"  # type: ignore[index]
        await tab.goto(url)
        await tab.locator("#parley-widget .launcher").wait_for()
        yield Page(tab, site, url)
        await context.close()


async def test_embedded_widget_streams_and_a_reload_mid_reply_completes_it_once() -> None:
    generator = GatedEcho(before=3)
    async with embedded(generator) as page:
        await page.open()
        text = "SLOW the reply keeps streaming after a reload"
        await page.say(text)
        await generator.holding.wait()
        # The first words are on screen while the rest is still being made.
        shown = await page.wait_for(lambda ms: any(
            m["role"] == "bot" and m["state"] == "streaming" and m["text"] == "SLOW the reply"
            for m in ms))
        assert [m["role"] for m in shown] == ["user", "bot"]
        await page.tab.reload()
        await page.tab.locator("#parley-widget .launcher").wait_for()
        # After the reload the widget restores the conversation, the partial reply with it.
        await page.wait_for(lambda ms: [m["text"] for m in ms] == [text, "SLOW the reply"])
        generator.gate.set()
        shown = await page.wait_for(lambda ms: any(m["state"] == "final" for m in ms))
        await asyncio.sleep(0.3)  # anything sent twice would arrive now
        shown = await page.messages()
        assert [(m["role"], m["text"], m["state"]) for m in shown] == [
            ("user", text, "sent"), ("bot", text, "final")]


async def test_xss_corpus_runs_no_script_and_leaves_no_handlers() -> None:
    assert len(PAYLOADS) >= 100
    async with embedded(GatedEcho()) as page:
        tab = page.tab
        await tab.add_init_script("window.__xss = 0; window.pwn = () => { window.__xss++; };")
        await tab.reload()
        dialogs: list[str] = []
        tab.on("dialog", lambda d: (dialogs.append(d.message), asyncio.ensure_future(d.dismiss())))
        # The detector works: the same payloads put into the page as HTML do run.
        await tab.evaluate("""(p) => { const d = document.createElement('div');
            d.innerHTML = p; document.body.append(d); }""",
                           '<img src="x:" onerror="pwn()">')
        await asyncio.sleep(0.3)
        assert await tab.evaluate("window.__xss") == 1
        await tab.evaluate("window.__xss = 0; document.body.lastChild.remove()")
        await page.open()
        for payload in PAYLOADS:
            await page.say(payload)
        shown = await page.wait_for(
            lambda ms: sum(m["role"] == "bot" and m["state"] in ("final", "notice", "error")
                           for m in ms) == len(PAYLOADS), seconds=60)
        await asyncio.sleep(0.5)  # timers and late loads a payload might have started
        report = await tab.evaluate("""() => {
          const root = document.getElementById('parley-widget').shadowRoot;
          const all = [...document.querySelectorAll('*'), ...root.querySelectorAll('*')];
          const handlers = all.flatMap((e) => [...e.attributes]
            .filter((a) => a.name.toLowerCase().startsWith('on'))
            .map((a) => e.tagName + ' ' + a.name));
          const log = root.querySelector('.log');
          // What the renderer made of the texts (the widget's own buttons are outside).
          const rendered = [...log.querySelectorAll('.body *')];
          const tags = [...new Set(rendered.map((e) => e.tagName.toLowerCase()))];
          const links = [...log.querySelectorAll('a')].map((a) => [a.getAttribute('href'), a.rel]);
          return {handlers, tags, links, xss: window.__xss};
        }""")
    assert report["xss"] == 0 and dialogs == []
    assert report["handlers"] == []
    assert set(report["tags"]) <= {"div", "span", "p", "br", "strong", "em", "code", "pre",
                                   "a", "ul", "ol", "li", "blockquote", "button"}
    for href, rel in report["links"]:
        assert href.split(":", 1)[0] in ("http", "https", "mailto"), href
        assert "noopener" in rel and "noreferrer" in rel
    # Every payload came back as a reply (the echo generator), none lost; those with
    # control characters are refused by the engine, with the reason shown.
    replies = [m for m in shown if m["role"] == "bot"]
    controls = [p for p in PAYLOADS if any(c in p for c in "\x00\x0b")]
    refused = [m for m in replies if m["state"] == "error"]
    assert len(refused) == len(controls) == 2
    assert all("control character" in m["text"] for m in refused)
    assert sum(m["state"] == "final" for m in replies) == len(PAYLOADS) - len(controls)


async def test_feedback_click_is_stored_and_markdown_is_rendered(tmp_path: Path) -> None:
    async with embedded(GatedEcho()) as page:
        await page.open()
        reply = ("Here is **how**:\n\n1. open [the docs](https://example.com/docs)\n"
                 "2. run `parley run`\n\n```\nparley run config/demo.toml\n```")
        await page.say(reply)
        await page.wait_for(lambda ms: any(m["state"] == "final" for m in ms))
        bot = page.tab.locator("#parley-widget .msg.bot[data-state=final]")
        assert await bot.locator("strong").inner_text() == "how"
        assert await bot.locator("ol li").count() == 2
        assert await bot.locator("a").get_attribute("href") == "https://example.com/docs"
        assert await bot.locator("pre code").inner_text() == "parley run config/demo.toml"
        assert await bot.locator("button.copy").count() == 1
        await bot.locator("button.down").click()
        await bot.locator("input.comment").fill("too terse")
        await bot.locator("input.comment").press("Enter")
        # The README's picture: PARLEY_SCREENSHOT=1 rewrites docs/widget.png (left alone
        # otherwise, so that running the tests does not change the checkout).
        shot = DOCS / "widget.png" if os.environ.get("PARLEY_SCREENSHOT") else tmp_path / "w.png"
        await page.tab.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        token = json.loads(await page.tab.evaluate(
            "Object.entries(localStorage).find(([k]) => k.startsWith('parley:'))[1]"))["token"]
        async with asyncio.timeout(5):
            while True:
                async with page.site.http.get(page.site.url + "/api/v1/feedback", headers={
                        "Authorization": f"Bearer {token}"}) as response:
                    records = (await response.json())["feedback"]
                if records and records[0]["comment"]:
                    break
                await asyncio.sleep(0.05)
    [record] = records
    assert record["rating"] == "down" and record["comment"] == "too terse"
    assert record["reply"] == reply.strip()


async def test_parleys_own_page_works_under_its_strict_csp() -> None:
    section = {"session_rate": 1, "rate_window": 60,
               "theme": {"mode": "dark", "accent": "#aa0000", "title": "Ask Parley",
                         "position": "left"}}
    async with serving(gated_engine(widget_settings(), GatedEcho()), section) as site, \
            browser() as chromium:
        tab = await chromium.new_page()
        violations: list[str] = []
        tab.on("console", lambda m: violations.append(m.text)
               if "Content Security Policy" in m.text else None)
        response = await tab.goto(site.url + "/")
        assert "unsafe-inline" not in response.headers["content-security-policy"]
        page = Page(tab, site, site.url + "/")
        # The keyboard alone: Tab reaches the bubble, Enter opens the panel with the
        # input focused, Escape closes it and gives the focus back to the bubble.
        await tab.locator("#parley-widget .launcher").wait_for()
        focused = """() => document.getElementById('parley-widget')
            .shadowRoot.activeElement?.className"""
        for _ in range(3):  # the page's own focusable elements come first
            await tab.keyboard.press("Tab")
            if await tab.evaluate(focused) == "launcher":
                break
        await tab.keyboard.press("Enter")
        await tab.locator("#parley-widget .input").wait_for(state="visible")
        assert await tab.evaluate(focused) == "input"
        await tab.keyboard.press("Escape")
        await tab.locator("#parley-widget .panel").wait_for(state="hidden")
        assert await tab.evaluate(focused) == "launcher"
        await tab.keyboard.press("Enter")
        await tab.keyboard.type("hello from the demo page")
        await tab.keyboard.press("Enter")
        shown = await page.wait_for(lambda ms: any(m["state"] == "final" for m in ms))
        # The theme from the bot's config.
        look = await tab.evaluate("""() => { const root = document.getElementById('parley-widget');
            const panel = root.shadowRoot.querySelector('.panel');
            return [getComputedStyle(root.shadowRoot.querySelector('header')).backgroundColor,
                    getComputedStyle(panel).backgroundColor,
                    root.shadowRoot.querySelector('.title').textContent,
                    panel.getBoundingClientRect().left < 100]; }""")
        assert look == ["rgb(170, 0, 0)", "rgb(17, 24, 39)", "Ask Parley", True]
        # A second message within the session's rate is refused, and the widget says so.
        await page.say("one more")
        status = tab.locator("#parley-widget .status")
        await status.filter(has_text="too fast").wait_for()
        assert await tab.locator("#parley-widget .msg.failed").count() == 1
        # Phone-sized screens get the panel full-width.
        await tab.set_viewport_size({"width": 375, "height": 700})
        width = await tab.evaluate("""() => document.getElementById('parley-widget')
            .shadowRoot.querySelector('.panel').getBoundingClientRect().width""")
    assert shown[-1]["text"] == "hello from the demo page"
    assert violations == []
    assert width == 375


async def test_a_refused_token_is_renewed_and_the_conversation_kept() -> None:
    async with embedded(GatedEcho()) as page:
        await page.open()
        await page.say("remember me")
        await page.wait_for(lambda ms: any(m["state"] == "final" for m in ms))
        key, stored = await page.tab.evaluate(
            "Object.entries(localStorage).find(([k]) => k.startsWith('parley:'))")
        data = json.loads(stored)
        claims = SessionSigner(BOT, SECRET, ttl=60).verify(data["token"])
        # The same session's token, expired ten seconds ago; the page still thinks it good.
        past = SessionSigner(BOT, SECRET, ttl=60, clock=lambda: time.time() - 70)
        expired = past.sign(Session(BOT, claims.user_id, claims.conversation_id,
                                    time.time() - 10, claims.verified))
        await page.tab.evaluate("([k, v]) => localStorage.setItem(k, v)",
                                [key, json.dumps({**data, "token": expired})])
        await page.tab.reload()
        await page.wait_for(lambda ms: [m["text"] for m in ms] == ["remember me"] * 2)
        renewed = json.loads(await page.tab.evaluate(f"localStorage.getItem({key!r})"))
    # A fresh token for the same session (minted in the same second as the first one, it
    # may equal it: tokens carry their expiry in whole seconds and no nonce).
    assert renewed["token"] != expired
    again = SessionSigner(BOT, SECRET, ttl=60).verify(renewed["token"])
    assert (again.user_id, again.conversation_id) == (claims.user_id, claims.conversation_id)
    assert renewed["conversation_id"] == data["conversation_id"]


async def test_a_plugins_message_shows_live_and_after_a_reload_without_a_rating() -> None:
    async with embedded(GatedEcho()) as page:
        await page.open()
        await page.say("hello there")
        await page.wait_for(lambda ms: any(m["state"] == "final" for m in ms))
        token = json.loads(await page.tab.evaluate(
            "Object.entries(localStorage).find(([k]) => k.startsWith('parley:'))[1]"))["token"]
        session = SessionSigner(BOT, SECRET, ttl=3600).verify(token)
        engine = page.site.engine
        # What a handoff agent's /reply does: the plugin API's send, on the web channel.
        await engine.plugins.services.outbox.send(
            ConversationKey(engine.name, "web", session.conversation_id),
            "A colleague here: **hold** the dial.")
        expected = [("user", "hello there", "sent"), ("bot", "hello there", "final"),
                    ("bot", "A colleague here: hold the dial.", "message")]
        for _ in range(2):
            shown = await page.wait_for(lambda ms: len(ms) == 3)
            assert [(m["role"], m["text"], m["state"]) for m in shown] == expected
            message = page.tab.locator("#parley-widget .msg.bot[data-state=message]")
            assert await message.locator("strong").inner_text() == "hold"
            assert await message.locator(".rate").count() == 0  # nothing of the model's
            await page.tab.reload()
            await page.tab.locator("#parley-widget .launcher").wait_for()

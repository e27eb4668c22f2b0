"""The Markdown models write, as the HTML subset Telegram parses.

Telegram's own Markdown modes reject much of what models produce (``**bold**``, a lone
``_``, unescaped ``.`` in MarkdownV2), so replies go out as HTML: everything escaped,
then the common Markdown forms turned into tags. Whatever still fails to parse is sent
as plain text by the adapter. The visible text is never longer than the Markdown it
came from, so a reply split to 4,096 units of Markdown fits after parsing.
"""

from __future__ import annotations

import html
import re

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})([^\n`]*)\n(.*?)(?:^ {0,3}\1[ \t]*$|\Z)",
                    re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[([^\]\n]+)\]\(((?:https?|tg)://[^)\s]+)\)")
_INLINE = (
    (re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*"), "b"),
    (re.compile(r"__(?=\S)(.+?)(?<=\S)__"), "b"),
    (re.compile(r"~~(?=\S)(.+?)(?<=\S)~~"), "s"),
    (re.compile(r"\|\|(?=\S)(.+?)(?<=\S)\|\|"), "tg-spoiler"),
    (re.compile(r"(?<![\w*])\*(?=[^\s*])([^*\n]+?)(?<=\S)\*(?![\w*])"), "i"),
    (re.compile(r"(?<![\w_])_(?=[^\s_])([^_\n]+?)(?<=\S)_(?![\w_])"), "i"),
)
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_LANG = re.compile(r"[\w+#.-]{1,32}")


def to_html(markdown: str) -> str:
    """``markdown`` as Telegram HTML (parse_mode="HTML")."""
    markdown = markdown.replace("\x00", "")  # NUL marks kept fragments below
    out: list[str] = []
    at = 0
    for match in _FENCE.finditer(markdown):
        out.append(_inline(markdown[at : match.start()]))
        lang = match.group(2).strip()
        code = html.escape(match.group(3).rstrip("\n"), quote=False)
        if _LANG.fullmatch(lang):
            out.append(f'<pre><code class="language-{lang}">{code}</code></pre>')
        else:
            out.append(f"<pre>{code}</pre>")
        at = match.end()
    out.append(_inline(markdown[at:]))
    return "".join(out)


def _inline(text: str) -> str:
    # Inline code and links first, kept aside so nothing inside them is formatted.
    kept: list[str] = []

    def keep(fragment: str) -> str:
        kept.append(fragment)
        return f"\x00{len(kept) - 1}\x00"

    text = _CODE.sub(lambda m: keep(f"<code>{html.escape(m.group(1), quote=False)}</code>"),
                     text)
    text = _LINK.sub(lambda m: keep(
        f'<a href="{html.escape(m.group(2))}">{html.escape(m.group(1), quote=False)}</a>'),
        text)
    text = html.escape(text, quote=False)
    text = _HEADING.sub(r"<b>\1</b>", text)
    for pattern, tag in _INLINE:
        text = pattern.sub(f"<{tag}>\\1</{tag}>", text)
    return re.sub(r"\x00(\d+)\x00", lambda m: kept[int(m.group(1))], text)

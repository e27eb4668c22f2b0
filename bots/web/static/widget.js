/* Parley chat widget: one script tag, no dependencies.
 *
 *   <script src="https://bot.example/widget.js" data-bot="support" async></script>
 *
 * Optional, for a site's logged-in user: data-user-id="42" data-user-hash="<hex HMAC-SHA256
 * of the user id with the bot's identity secret, made by the site's server>".
 *
 * Everything the server or a user sends is untrusted text: the DOM is built with
 * createElement/textContent only (never innerHTML), links are http(s)/mailto only, and
 * images in replies are shown as links, never loaded.
 */
(function () {
  "use strict";
  const script = document.currentScript ||
    document.querySelector('script[data-bot][src*="widget.js"]');
  if (!script || script.dataset.parleyLoaded) return;
  script.dataset.parleyLoaded = "1";

  const base = new URL(".", script.src).href.replace(/\/$/, "");
  const bot = script.dataset.bot || "bot";
  const siteUser = script.dataset.userId || "";
  const siteHash = script.dataset.userHash || "";
  const storeKey = "parley:" + base + ":" + bot + ":" + (siteUser || "visitor");
  const PING_EVERY = 25000;
  const PONG_WAIT = 10000;

  // ---- safe markdown -----------------------------------------------------------------

  const INLINE = new RegExp([
    "(`+)([^`][\\s\\S]*?)\\1",                                  // 1,2 code span
    "!\\[([^\\]\\n]*)\\]\\(([^)\\s]*)(?:\\s+\"[^\"\\n]*\")?\\)", // 3,4 image
    "\\[([^\\]\\n]+)\\]\\(([^)\\s]*)(?:\\s+\"[^\"\\n]*\")?\\)",  // 5,6 link
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",                       // 7 strong
    "__(?=\\S)([\\s\\S]*?\\S)__",                               // 8 strong
    "\\*(?=[^\\s*])([^*\\n]*?[^\\s*])\\*",                      // 9 em
    "\\b_(?=[^\\s_])([^_\\n]*?[^\\s_])_\\b",                    // 10 em
    "<((?:https?|mailto):[^>\\s]+)>",                           // 11 autolink
    "(https?:\\/\\/[^\\s<>\"']*[^\\s<>\"'.,;:!?)\\]])",         // 12 bare URL
  ].join("|"), "g");

  function safeUrl(raw) {
    try {
      const url = new URL(raw);  // absolute only: a relative one would point at this page
      return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  function link(href, label) {
    const a = document.createElement("a");
    a.href = href;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    a.textContent = label;
    return a;
  }

  function inline(text, parent, depth) {
    let at = 0;
    const pattern = new RegExp(INLINE.source, "g");
    let m;
    while ((m = pattern.exec(text)) !== null) {
      if (m.index > at) parent.append(text.slice(at, m.index));
      at = pattern.lastIndex;
      if (m[2] !== undefined) {
        const code = document.createElement("code");
        code.textContent = m[2];
        parent.append(code);
      } else if (m[4] !== undefined) {
        const href = safeUrl(m[4]);  // images are never loaded: at most a link
        parent.append(href ? link(href, "image: " + (m[3] || href)) : m[0]);
      } else if (m[6] !== undefined) {
        const href = safeUrl(m[6]);
        if (href) {
          const a = link(href, "");
          if (depth < 3) inline(m[5], a, depth + 1); else a.textContent = m[5];
          a.querySelectorAll("a").forEach((inner) => inner.replaceWith(inner.textContent));
          parent.append(a);
        } else {
          parent.append(m[0]);
        }
      } else if (m[7] !== undefined || m[8] !== undefined || m[9] !== undefined ||
                 m[10] !== undefined) {
        const strong = m[7] !== undefined || m[8] !== undefined;
        const el = document.createElement(strong ? "strong" : "em");
        const inner = m[7] ?? m[8] ?? m[9] ?? m[10];
        if (depth < 3) inline(inner, el, depth + 1); else el.textContent = inner;
        parent.append(el);
      } else {
        const raw = m[11] ?? m[12];
        const href = safeUrl(raw);
        parent.append(href ? link(href, raw) : raw);
      }
    }
    if (at < text.length) parent.append(text.slice(at));
  }

  function lines(parent, block) {
    block.forEach((line, i) => {
      if (i) parent.append(document.createElement("br"));
      inline(line, parent, 0);
    });
  }

  function codeBlock(code) {
    const wrap = document.createElement("div");
    wrap.className = "code";
    const pre = document.createElement("pre");
    const el = document.createElement("code");
    el.textContent = code;
    pre.append(el);
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy code");
    copy.addEventListener("click", () => {
      const done = () => { copy.textContent = "Copied"; setTimeout(() => { copy.textContent = "Copy"; }, 1500); };
      if (navigator.clipboard) navigator.clipboard.writeText(code).then(done, () => {});
    });
    wrap.append(copy, pre);
    return wrap;
  }

  /** Markdown to DOM nodes: paragraphs, code blocks, lists, quotes, headings, inline. */
  function markdown(text) {
    const out = document.createDocumentFragment();
    const rows = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < rows.length) {
      const row = rows[i];
      const fence = /^\s*(```|~~~)/.exec(row);
      if (fence) {
        const body = [];
        i++;
        while (i < rows.length && !rows[i].trim().startsWith(fence[1])) body.push(rows[i++]);
        i++;  // the closing fence (absent while a reply still streams)
        out.append(codeBlock(body.join("\n")));
        continue;
      }
      if (!row.trim()) { i++; continue; }
      const list = /^\s*(?:[-*+]|(\d{1,9})[.)])\s+/.exec(row);
      if (list) {
        const ordered = list[1] !== undefined;
        const el = document.createElement(ordered ? "ol" : "ul");
        const item = ordered ? /^\s*\d{1,9}[.)]\s+/ : /^\s*[-*+]\s+/;
        while (i < rows.length && item.test(rows[i])) {
          const li = document.createElement("li");
          inline(rows[i].replace(item, ""), li, 0);
          el.append(li);
          i++;
        }
        out.append(el);
        continue;
      }
      if (/^\s*>/.test(row)) {
        const quote = document.createElement("blockquote");
        const body = [];
        while (i < rows.length && /^\s*>/.test(rows[i])) body.push(rows[i++].replace(/^\s*>\s?/, ""));
        lines(quote, body);
        out.append(quote);
        continue;
      }
      const heading = /^\s*#{1,6}\s+(.*)$/.exec(row);
      const p = document.createElement("p");
      if (heading) {
        const strong = document.createElement("strong");
        inline(heading[1], strong, 0);
        p.append(strong);
        out.append(p);
        i++;
        continue;
      }
      const body = [];
      while (i < rows.length && rows[i].trim() && !/^\s*(```|~~~|>|[-*+]\s|\d{1,9}[.)]\s|#{1,6}\s)/.test(rows[i])) {
        body.push(rows[i++]);
      }
      if (!body.length) body.push(rows[i++]);
      lines(p, body);
      out.append(p);
    }
    return out;
  }

  // ---- the panel ---------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    node.append(...children);
    return node;
  }

  const ICONS = {  // 24x24 outline paths (no font needed for them)
    chat: "M4 5h16v11H8l-4 4z",
    up: "M7 11v9H4v-9zM7 11l4-7c1.5 0 2.5 1 2.2 2.6L12.6 10H19c1.2 0 2 1 1.8 2.2l-1.3 6.2c-.2.9-1 1.6-1.9 1.6H7",
    down: "M7 13V4H4v9zM7 13l4 7c1.5 0 2.5-1 2.2-2.6L12.6 14H19c1.2 0 2-1 1.8-2.2l-1.3-6.2C19.3 4.7 18.5 4 17.6 4H7",
  };

  function icon(name) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("class", "icon");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", ICONS[name]);
    svg.append(path);
    return svg;
  }

  const host = el("div", { id: "parley-widget", "data-bot": bot });
  const root = host.attachShadow({ mode: "open" });
  const style = el("link", { rel: "stylesheet", href: base + "/widget.css" });
  const bubble = el("button", { class: "launcher", type: "button", "aria-label": "Open chat",
                                "aria-expanded": "false", "aria-controls": "parley-panel" });
  bubble.append(icon("chat"));
  const title = el("h2", { class: "title", id: "parley-title", text: "Chat" });
  const close = el("button", { class: "close", type: "button", "aria-label": "Close chat", text: "×" });
  const log = el("div", { class: "log", role: "log", "aria-live": "polite", "aria-relevant": "additions" });
  const status = el("div", { class: "status", role: "status" });
  const input = el("textarea", { class: "input", rows: "1", "aria-label": "Message", maxlength: "4000" });
  const send = el("button", { class: "send", type: "submit", text: "Send" });
  const form = el("form", { class: "composer" }, input, send);
  const panel = el("section", { class: "panel", id: "parley-panel", role: "dialog",
                                "aria-labelledby": "parley-title", hidden: "" },
    el("header", {}, title, close), log, status, form);
  root.append(style, panel, bubble);

  function setOpen(open) {
    panel.hidden = !open;
    host.dataset.open = open ? "1" : "0";
    bubble.setAttribute("aria-expanded", String(open));
    bubble.setAttribute("aria-label", open ? "Close chat" : "Open chat");
    if (open) { input.focus(); log.scrollTop = log.scrollHeight; } else bubble.focus();
  }
  bubble.addEventListener("click", () => setOpen(panel.hidden));
  close.addEventListener("click", () => setOpen(false));
  panel.addEventListener("keydown", (e) => { if (e.key === "Escape") setOpen(false); });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
  });

  function applyTheme(theme) {
    host.style.setProperty("--parley-accent", theme.accent);
    host.style.setProperty("--parley-accent-text", theme.accent_text);
    host.className = "mode-" + theme.mode + " at-" + theme.position;
    title.textContent = theme.title;
    input.placeholder = theme.placeholder;
    greeting = theme.greeting;
    if (theme.open && panel.hidden) setOpen(true);
  }

  // ---- messages ----------------------------------------------------------------------

  const bubbles = new Map();  // "u:<id>" / "b:<id>" -> {node, body, text, final}
  const outbox = new Map();   // client id -> text, until the server has logged it
  let greeting = "";
  let last = 0;
  let paint = null;

  function scroll() { log.scrollTop = log.scrollHeight; }

  function reset() {
    bubbles.clear();
    log.replaceChildren();
    if (greeting) log.append(el("div", { class: "msg bot greeting", text: greeting }));
  }

  function userBubble(id, text) {
    let b = bubbles.get("u:" + id);
    if (!b) {
      const body = el("div", { class: "body", text });
      const node = el("div", { class: "msg user", "data-mid": id, "data-role": "user" }, body);
      b = { node, body, text, final: true };
      bubbles.set("u:" + id, b);
      log.append(node);
      scroll();
    }
    return b;
  }

  function botBubble(id) {
    let b = bubbles.get("b:" + id);
    if (!b) {
      const body = el("div", { class: "body" });
      const node = el("div", { class: "msg bot", "data-mid": id, "data-role": "bot",
                                "data-state": "typing" }, body);
      body.append(el("span", { class: "typing", "aria-label": "typing", text: "…" }));
      b = { node, body, text: "", final: false };
      bubbles.set("b:" + id, b);
      const mine = bubbles.get("u:" + id);
      if (mine && mine.node.nextSibling) mine.node.after(node); else log.append(node);
      scroll();
    }
    return b;
  }

  function render(b) {
    b.body.replaceChildren(markdown(b.text));
    scroll();
  }

  function schedule(b) {
    b.dirty = true;
    if (paint) return;
    paint = requestAnimationFrame(() => {
      paint = null;
      for (const x of bubbles.values()) if (x.dirty) { x.dirty = false; render(x); }
    });
  }

  function finish(b, id, text, state) {
    b.text = text;
    b.final = true;
    b.dirty = false;
    b.node.dataset.state = state;
    if (state === "final" || state === "message") {
      render(b);
      // A plugin's message (a colleague's answer) is not the model's: nothing to rate.
      if (state === "final" && !b.node.querySelector(".rate")) b.node.append(rateBar(id));
    } else {
      b.body.textContent = text;  // notices and errors are plain text
    }
    scroll();
  }

  function onEvent(ev) {
    if (typeof ev.seq === "number") {
      if (ev.seq <= last) return;  // seen before: nothing twice
      last = ev.seq;
    }
    const id = String(ev.message_id);
    const text = String(ev.text ?? "");
    if (ev.kind === "user") {
      outbox.delete(id);
      userBubble(id, text).node.dataset.state = "sent";
      return;
    }
    // "silent": the bot let the message pass without a word (e.g. to a colleague).
    if (ev.kind === "notice" && (ev.code === "duplicate" || ev.code === "silent")) return;
    const b = botBubble(id);
    if (b.final && ev.kind !== "error") return;
    if (ev.kind === "delta") {
      if (b.node.dataset.state === "typing") { b.node.dataset.state = "streaming"; b.text = ""; }
      b.text += text;
      schedule(b);
    } else if (ev.kind === "reset") {
      b.text = "";
      b.node.dataset.state = "streaming";
      schedule(b);
    } else if (ev.kind === "final") {
      finish(b, id, text, "final");
    } else if (ev.kind === "message") {
      finish(b, id, text, "message");
    } else if (ev.kind === "notice") {
      finish(b, id, text, "notice");
    } else if (ev.kind === "error") {
      finish(b, id, text, "error");
      b.node.classList.add("error");
    }
  }

  function onHistory(frame) {
    reset();
    for (const turn of frame.turns) {
      const id = String(turn.message_id);
      if (turn.role === "user") userBubble(id, String(turn.text)).node.dataset.state = "sent";
      else {
        // kind: "message" (a plugin's), "notice" or "error"; none for the model's replies.
        const kind = ["message", "notice", "error"].includes(turn.kind) ? turn.kind : "final";
        const b = botBubble(id);
        finish(b, id, String(turn.text), kind);
        if (kind === "error") b.node.classList.add("error");
      }
    }
    // Replies still being made: their events so far (numbered up to frame.last).
    last = 0;
    for (const ev of frame.in_flight || []) onEvent(ev);
    last = frame.last;
    // Messages typed before the page knew its conversation are shown again.
    for (const [id, text] of outbox) userBubble(id, text).node.dataset.state = "pending";
  }

  function rateBar(id) {
    const bar = el("div", { class: "rate" });
    const up = el("button", { type: "button", class: "up", "aria-label": "Good answer", "aria-pressed": "false" }, icon("up"));
    const down = el("button", { type: "button", class: "down", "aria-label": "Bad answer", "aria-pressed": "false" }, icon("down"));
    const comment = el("input", { class: "comment", type: "text", maxlength: "2000",
                                   "aria-label": "Tell us more (optional)", placeholder: "Tell us more (optional)", hidden: "" });
    let rating = null;
    const give = (value) => {
      rating = value;
      up.setAttribute("aria-pressed", String(value === "up"));
      down.setAttribute("aria-pressed", String(value === "down"));
      comment.hidden = false;
      sendFrame({ type: "feedback", message_id: id, rating });
    };
    up.addEventListener("click", () => give("up"));
    down.addEventListener("click", () => give("down"));
    comment.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && rating) {
        e.preventDefault();
        sendFrame({ type: "feedback", message_id: id, rating, comment: comment.value });
        comment.hidden = true;
      }
    });
    bar.append(up, down, comment);
    return bar;
  }

  // ---- the connection ----------------------------------------------------------------

  let session = null;
  let renew = false;
  let ws = null;
  let backoff = 500;
  let pingTimer = null;
  let pongTimer = null;

  function showStatus(text) { status.textContent = text; }

  function loadSession() {
    try { return JSON.parse(localStorage.getItem(storeKey) || "null"); } catch (e) { return null; }
  }

  async function newSession(previous) {
    const body = siteUser && siteHash
      ? { identity: { user_id: siteUser, signature: siteHash } }
      : (previous ? { token: previous.token } : {});
    const response = await fetch(base + "/api/v1/session", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), credentials: "omit",
    });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || "the chat is not available here");
    try { localStorage.setItem(storeKey, JSON.stringify(data)); } catch (e) { /* private mode */ }
    return data;
  }

  function sendFrame(frame) {
    if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify(frame)); return true; }
    return false;
  }

  function flushOutbox() {
    for (const [id, text] of outbox) sendFrame({ type: "message", id, text });
  }

  async function connect() {
    clearTimeout(pingTimer);
    clearTimeout(pongTimer);
    try {
      const stored = session || loadSession();
      const fresh = !renew && stored && stored.expires_at * 1000 > Date.now() + 60000;
      session = fresh ? stored : await newSession(stored);
      renew = false;
      if (!title.dataset.themed) { title.dataset.themed = "1"; applyTheme(session.theme); if (!last) reset(); }
    } catch (err) {
      showStatus("Chat unavailable: " + err.message);
      return retry();
    }
    const url = base.replace(/^http/, "ws") + "/api/v1/ws";
    const socket = new WebSocket(url, ["parley.v1", "bearer." + session.token]);
    let opened = false;
    ws = socket;
    socket.onopen = () => {
      opened = true;
      backoff = 500;
      showStatus("");
      socket.send(JSON.stringify({ type: "resume", after: last }));
      heartbeat();
    };
    socket.onmessage = (msg) => {
      clearTimeout(pongTimer);
      let frame;
      try { frame = JSON.parse(msg.data); } catch (e) { return; }
      if (frame.type === "events") frame.events.forEach(onEvent);
      else if (frame.type === "history") onHistory(frame);
      else if (frame.type === "resumed") flushOutbox();
      else if (frame.type === "error") onError(frame);
      else if (frame.type === "feedback_saved") markRated(frame.message_id);
    };
    socket.onclose = () => {
      if (ws !== socket) return;
      ws = null;
      clearTimeout(pingTimer);
      clearTimeout(pongTimer);
      if (!opened) {
        // Refused at the handshake (an expired token, a rotated secret): renew the token
        // first; the server keeps the conversation if the old token is still its own.
        session = null;
        renew = true;
      }
      showStatus("Reconnecting…");
      retry();
    };
  }

  function retry() {
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 15000);
  }

  function heartbeat() {
    pingTimer = setTimeout(() => {
      if (!sendFrame({ type: "ping" })) return;
      pongTimer = setTimeout(() => { if (ws) ws.close(); }, PONG_WAIT);
      heartbeat();
    }, PING_EVERY);
  }

  function onError(frame) {
    showStatus(String(frame.text || "Something went wrong."));
    if (frame.id && outbox.has(frame.id)) {
      outbox.delete(frame.id);
      const b = bubbles.get("u:" + frame.id);
      if (b) { b.node.dataset.state = "failed"; b.node.classList.add("failed"); }
    }
  }

  function markRated(id) {
    const b = bubbles.get("b:" + id);
    if (b) b.node.dataset.rated = "1";
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    const id = (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random()).replace(/[^A-Za-z0-9_-]/g, "");
    outbox.set(id, text);
    userBubble(id, text).node.dataset.state = "pending";
    showStatus("");
    sendFrame({ type: "message", id, text });
  });

  window.addEventListener("online", () => { if (!ws) connect(); });
  function mount() { document.body.append(host); connect(); }
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);
})();

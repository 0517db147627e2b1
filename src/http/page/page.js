// dfwatch's page: streams, live events, reviews. Plain script, same origin only; every text
// from the daemon goes in as text, never as markup.
"use strict";

const PAGE = 10;
const STREAMS_EVERY_MS = 3000;
// The bearer token, for reviews and for renewing the session: in this tab's memory, never
// stored.
let token = null;
// The session's tab secret (beside its cookie, which scripts cannot read): sent with every
// read, in this tab's memory only, so the cookie alone (which other ports of this host can
// see) reads nothing.
let tab = null;
// Sessions last an hour; the page renews its own at half that while it holds the token.
const RENEW_EVERY_MS = 30 * 60 * 1000;
let cursor = null;
let live = null;
// Set when a read was refused (reads need the token here and there is no session): polling
// and reconnecting wait for a sign-in rather than knock on a closed door.
let needAuth = false;

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function say(id, text, error) {
  const m = $(id);
  m.textContent = text;
  m.classList.toggle("error", !!error);
}

async function api(path, opts) {
  const o = opts || {};
  const headers = {};
  if (o.body !== undefined) headers["Content-Type"] = "application/json";
  if (o.bearer) headers["Authorization"] = "Bearer " + o.bearer;
  if (tab) headers["X-Dfwatch-Tab"] = tab;
  return fetch(path, {
    method: o.method || "GET",
    headers,
    body: o.body === undefined ? undefined : JSON.stringify(o.body),
    credentials: "same-origin",
    cache: "no-store",
  });
}

// The tab secret as a query parameter, where no header can go (images, EventSource).
function tabQuery(sep) {
  return tab ? `${sep}tab=${encodeURIComponent(tab)}` : "";
}

function when(rfc3339) {
  if (!rfc3339) return "";
  const d = new Date(rfc3339);
  return isNaN(d) ? rfc3339 : d.toLocaleString();
}

function pct(x) {
  return (Math.round(Math.max(0, Math.min(1, Number(x) || 0)) * 1000) / 10).toFixed(1) + "%";
}

// The model and its banner.
async function loadModel() {
  try {
    const r = await api("/readyz");
    const body = await r.json();
    const m = body.model || {};
    $("model").textContent = `${m.name || "?"} ${m.version || ""} · ${m.backend || ""}`;
    $("synthetic").hidden = m.trained !== false;
  } catch (e) {
    $("model").textContent = "model: unknown (daemon not answering)";
  }
}

function needSignIn(why) {
  say("signin-msg", why, true);
}

function refused() {
  needAuth = true;
  if (live) {
    live.close();
    live = null;
  }
  setConn("offline", "Signed out: sign in to see live updates");
  needSignIn("Sign in to read: this daemon's API asks for the token.");
}

// A read of the API: its JSON, or null after saying in `msg` why there is none (a refusal
// also stops the page asking until it is signed in).
async function read(path, msg, what) {
  let r;
  try {
    r = await api(path);
  } catch (e) {
    say(msg, "The daemon does not answer.", true);
    return null;
  }
  if (r.status === 401) {
    say(msg, "Reading needs the API token here: sign in above.", true);
    refused();
    return null;
  }
  if (!r.ok) {
    say(msg, `${what} not available (HTTP ${r.status}).`, true);
    return null;
  }
  return r.json();
}

// Streams: state, decoder, coverage, reconnects, live verdict.
async function loadStreams() {
  const streams = await read("/api/streams", "streams-msg", "Streams");
  if (streams === null) return;
  const list = $("streams");
  list.replaceChildren(
    ...streams.map((s) => {
      const v = s.verdict || {};
      const verdict = v.verdict || "none";
      const score = typeof v.score === "number" ? ` ${pct(v.score)}` : "";
      return el(
        "li",
        { class: "stream", "data-stream": s.id },
        el("h3", {}, el("span", { text: s.id }),
          el("span", { class: `chip ${verdict}`, text: `${verdict}${score}` })),
        el("dl", {},
          el("dt", { text: "state" }), el("dd", { text: s.status.state }),
          el("dt", { text: "coverage" }), el("dd", { text: pct(s.coverage) }),
          el("dt", { text: "reconnects" }), el("dd", { text: s.status.reconnects }),
          el("dt", { text: "decoder" }), el("dd", { text: s.status.decoder || "–" }),
          el("dt", { text: "tracks" }), el("dd", { text: s.tracks }),
          el("dt", { text: "faces scored" }), el("dd", { text: s.faces_scored })),
      );
    }),
  );
  say("streams-msg", streams.length ? "" : "No streams.");
}

function bars(title, items) {
  const top = (items || []).slice(0, 5);
  if (!top.length) return null;
  return el("div", {},
    el("h4", { text: title }),
    ...top.map((m) => {
      // Through the CSSOM: the page's policy refuses inline style attributes.
      const fill = el("span", { class: "fill" });
      fill.style.width = pct(m.q);
      return el("div", { class: "bar", role: "img", "aria-label": `${m.name} ${pct(m.q)}` },
        el("span", { text: m.name }),
        el("span", { class: "track" }, fill),
        el("span", { class: "pct", text: pct(m.q) }));
    }));
}

function eventCard(e) {
  const x = e.explanation || {};
  const media = [];
  if (e.has_snapshot) {
    media.push(el("figure", {},
      el("img", { src: `/api/events/${e.alert_id}/snapshot.jpg?s=${e.seq}${tabQuery("&")}`, loading: "lazy",
        alt: `Frame of the strongest face of track ${e.track_id} on ${e.stream}, face box drawn` }),
      el("figcaption", { text: "strongest frame" })));
  }
  if (e.has_face) {
    media.push(el("figure", { class: "face" },
      el("img", { src: `/api/events/${e.alert_id}/face.jpg?s=${e.seq}${tabQuery("&")}`, loading: "lazy",
        alt: `Aligned face crop of track ${e.track_id}` }),
      el("figcaption", { text: "face crop" })));
  }
  const reviewButton = (value, label) =>
    el("button", {
      type: "button",
      class: `review-${value}`,
      "aria-pressed": e.review === value ? "true" : "false",
      onclick: () => review(e.alert_id, value),
    }, label);
  const said = e.review
    ? `Reviewed: ${e.review === "false_alarm" ? "false alarm" : "confirmed"} ${when(e.reviewed)}`
    : "Not reviewed";
  return el("article", { class: "event", id: `ev-${e.alert_id}`, "data-seq": e.seq,
      "aria-labelledby": `evh-${e.alert_id}` },
    el("h3", { id: `evh-${e.alert_id}` },
      el("span", { class: `chip ${e.verdict}`, text: `${e.verdict} ${pct(e.max_score)}` }),
      el("span", { text: `${e.stream} · track ${e.track_id}` }),
      el("span", { class: `chip ${e.state}`, text: e.state })),
    el("p", { class: "meta", text:
      `started ${when(e.started)}` + (e.ended ? ` · ended ${when(e.ended)}` : "") +
      (e.end_reason ? ` (${e.end_reason.replace(/_/g, " ")})` : "") }),
    el("p", { class: "sentence", text: e.sentence || x.sentence || "" }),
    el("div", { class: "explain" }, bars("Attributes", x.attributes), bars("Regions", x.regions)),
    media.length ? el("div", { class: "media" }, ...media) : null,
    el("div", { class: "review", role: "group", "aria-label": "Review" },
      reviewButton("false_alarm", "False alarm"),
      reviewButton("confirmed", "Confirmed"),
      el("span", { class: "said", text: said })));
}

// Puts an event's card in place: replaced where it is, or added in id order (ids grow with
// time: the newest is first).
function upsert(e) {
  const card = eventCard(e);
  const old = $(`ev-${e.alert_id}`);
  if (old) {
    if (Number(old.dataset.seq) > e.seq) return;
    old.replaceWith(card);
    return;
  }
  const list = $("events");
  for (const c of list.children) {
    if (c.id.slice(3) < e.alert_id) {
      list.insertBefore(card, c);
      return;
    }
  }
  // Older than every card shown: it belongs to a page not loaded yet, unless none is left.
  if (cursor === null) list.append(card);
  say("events-msg", "");
}

async function loadEvents(reset) {
  if (reset) {
    cursor = null;
    $("events").replaceChildren();
  }
  const q = new URLSearchParams({ limit: String(PAGE) });
  if (!reset && cursor) q.set("cursor", cursor);
  const page = await read(`/api/events?${q}`, "events-msg", "Events");
  if (page === null) return;
  const list = $("events");
  for (const e of page.events) {
    if (!$(`ev-${e.alert_id}`)) list.append(eventCard(e));
  }
  cursor = page.next_cursor;
  $("older").hidden = !cursor;
  if (!list.children.length) say("events-msg", "No events yet.");
  else say("events-msg", "");
}

async function review(id, value) {
  if (!token) {
    needSignIn("Sign in with the API token to review events.");
    $("token").focus();
    return;
  }
  const r = await api(`/api/events/${id}/review`, {
    method: "POST", bearer: token, body: { review: value },
  });
  if (r.ok) {
    upsert(await r.json());
    const card = $(`ev-${id}`);
    const pressed = card && card.querySelector(`.review-${value}`);
    if (pressed) pressed.focus();
  } else if (r.status === 401) {
    token = null;
    needSignIn("The token was refused: sign in again.");
  } else {
    say("events-msg", `The review was not saved (HTTP ${r.status}).`, true);
  }
}

function setConn(state, text) {
  const c = $("conn");
  c.className = `conn ${state}`;
  c.textContent = text;
}

// Live events over server-sent events. The browser reconnects by itself after a dropped
// connection (sending Last-Event-ID, so the daemon replays what changed); after a refusal it
// does not, so the page tries again.
function connectLive(fresh) {
  if (needAuth) return;
  if (live) live.close();
  const es = new EventSource(`/api/events/stream${tabQuery("?")}`);
  live = es;
  es.onopen = () => {
    setConn("live", "Live");
    // A new connection carries no Last-Event-ID: what changed meanwhile comes with a reload.
    if (fresh) loadEvents(true);
  };
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) {
      if (needAuth) return;
      setConn("offline", "Offline: live updates stopped, retrying…");
      setTimeout(() => { if (live === es) connectLive(true); }, 5000);
    } else {
      setConn("reconnecting", "Connection lost: reconnecting…");
    }
  };
  for (const kind of ["new", "update", "end", "review"]) {
    es.addEventListener(kind, (m) => {
      const d = JSON.parse(m.data);
      if (d.event) upsert(d.event);
    });
  }
  es.addEventListener("delete", (m) => {
    const d = JSON.parse(m.data);
    const card = $(`ev-${d.alert_id}`);
    if (card) card.remove();
  });
  es.addEventListener("reset", () => loadEvents(true));
}

async function signIn(ev) {
  ev.preventDefault();
  const given = $("token").value.trim();
  if (!given) {
    needSignIn("Enter the API token.");
    return;
  }
  let r;
  try {
    r = await api("/api/session", { method: "POST", bearer: given });
  } catch (e) {
    needSignIn("The daemon does not answer.");
    return;
  }
  if (r.status === 200) {
    tab = (await r.json()).tab;
    token = given;
    needAuth = false;
    $("token").value = "";
    say("signin-msg", "Signed in: reviews are on for this tab.");
    await Promise.all([loadStreams(), loadEvents(true)]);
    connectLive();
  } else if (r.status === 429) {
    needSignIn("Too many failed attempts from this address: wait a minute.");
  } else {
    needSignIn("That token was refused.");
  }
}

// A new session before the old one expires, while this tab holds the token; the live
// stream moves to it.
async function renewSession() {
  if (!token) return;
  try {
    const r = await api("/api/session", { method: "POST", bearer: token });
    if (r.status === 200) {
      tab = (await r.json()).tab;
      if (live) connectLive(true);
    }
  } catch (e) {
    // The daemon does not answer: the next read says so.
  }
}

function start() {
  $("signin-form").addEventListener("submit", signIn);
  $("older").addEventListener("click", () => loadEvents(false));
  loadModel();
  loadStreams();
  loadEvents(true);
  connectLive();
  setInterval(() => { if (!needAuth) loadStreams(); }, STREAMS_EVERY_MS);
  setInterval(renewSession, RENEW_EVERY_MS);
}

start();

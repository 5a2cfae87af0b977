// The chat page: sends the conversation to /v1/chat/completions (stream: true) and renders the streamed answer,
// then its source entry (or "not in my notes") from the extension fields of the last chunk. No build step, no CDN.
"use strict";

const MODEL = "ohlora-tutor";
const log = document.getElementById("log");
const form = document.getElementById("ask");
const input = document.getElementById("question");
const send = document.getElementById("send");
const statusEl = document.getElementById("status");
const HANGUL = /[\u1100-\u11ff\u3130-\u318f\uac00-\ud7a3]/;
let messages = [];  // the conversation so far, OpenAI shape
let busy = false;
let ready = false;  // the models are loaded (GET /health); sending waits for it
let inFlight = null;  // the AbortController of the answer being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem("ohlora-api-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function element(tag, cls, text) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  if (text !== undefined) el.textContent = text;
  return el;
}

// Follow the answer only while the reader is at the bottom: scrolling up to reread is not undone by every token.
function atBottom() { return log.scrollHeight - log.scrollTop - log.clientHeight < 48; }
function scrollDown() { log.scrollTop = log.scrollHeight; }

function markLanguage(el, text) { if (HANGUL.test(text)) el.lang = "ko"; }

function addMessage(role, text) {
  const hello = document.getElementById("hello");
  if (hello) hello.remove();
  const box = element("div", "msg " + role);
  const body = element("div", "text", text || "");
  markLanguage(box, text || "");
  box.appendChild(body);
  log.appendChild(box);
  scrollDown();
  return box;
}

function showSource(box, final) {
  const used = (final.sources || []).find((s) => s.used);
  const answered = used && !final.declined;
  let el;
  if (answered) {
    el = element("details", "source");
    const summary = element("summary");
    const score = element("span", "score", "(" + used.score.toFixed(3) + ")");
    score.title = "similarity between your question and this entry";
    summary.append("source: ", element("span", "title", used.title), " ", score);
    if (final.follow_up) summary.appendChild(element("span", "tag", "follow-up"));
    el.appendChild(summary);
    const entry = element("p", "entry", used.text);
    markLanguage(entry, used.text);
    el.appendChild(entry);
  } else {
    el = element("div", "source none");
    el.append(element("strong", null, "Not in my notes"), used
      ? " — the closest entry (" + used.title + ") does not answer this"
      : " — nothing in the concept DB matches this question");
  }
  el.dataset.kind = answered ? "source" : "none";
  const follow = atBottom();
  box.appendChild(el);
  if (follow) scrollDown();
}

// A readable message for a failed request: the server's JSON error message, else the HTTP status.
async function failure(response) {
  const raw = await response.text().catch(() => "");
  let message = "";
  try { const body = JSON.parse(raw); message = (body.error && body.error.message) || body.detail || ""; } catch (e) { /* not JSON */ }
  if (typeof message !== "string") message = JSON.stringify(message);
  return new Error((message || response.statusText || "the request failed") + " (HTTP " + response.status + ")");
}

// Server-sent events → the JSON of each `data:` event; "[DONE]" ends the stream. Lines end in \n, \r\n or \r.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
    // A lone trailing \r may be the first half of \r\n: keep it until the next read.
    const parts = buffer.split(/\r\n\r\n|\n\n|\r\r/);
    buffer = done ? "" : parts.pop();
    for (const event of parts) {
      const data = event.split(/\r\n|\n|\r/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(l.startsWith("data: ") ? 6 : 5)).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      let chunk;
      try { chunk = JSON.parse(data); } catch (e) { throw new Error("the server sent a malformed event — try again"); }
      if (chunk.error) throw new Error(chunk.error.message || "the server failed while answering");
      yield chunk;
    }
    if (done) return;
  }
}

async function ask(question) {
  busy = true; send.disabled = true;
  addMessage("user", question);
  messages.push({ role: "user", content: question });
  const conversation = messages;
  const box = addMessage("tutor pending", "");
  const text = box.querySelector(".text");
  const controller = new AbortController();
  inFlight = controller;
  let final = null;
  try {
    let response;
    try {
      response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), signal: controller.signal,
        body: JSON.stringify({ model: MODEL, messages: conversation, stream: true }),
      });
    } catch (err) {
      if (controller.signal.aborted) throw err;
      setTimeout(health, 0);
      throw new Error("cannot reach the server — is `ohlora-rag serve` still running?");
    }
    if (response.status === 401) {
      const key = prompt("This tutor needs an API key:");
      if (key) localStorage.setItem("ohlora-api-key", key);
      throw new Error("missing or wrong API key — send the question again");
    }
    if (response.status === 503) { ready = false; setTimeout(health, 0); }
    if (!response.ok) throw await failure(response);
    for await (const chunk of events(response)) {
      const choice = (chunk.choices && chunk.choices[0]) || {};
      const piece = choice.delta && choice.delta.content;
      if (piece) { const follow = atBottom(); text.textContent += piece; if (follow) scrollDown(); }
      if (choice.finish_reason) final = chunk;
    }
    if (!final) throw new Error("the answer was cut off — try again");
    text.textContent = final.answer;  // the final text (the guard may have replaced an invented answer)
    markLanguage(box, final.answer);
    box.classList.remove("pending");
    box.dataset.done = "true";
    showSource(box, final);
    conversation.push({ role: "assistant", content: final.answer });
  } catch (err) {
    if (controller.signal.aborted) return;  // "New chat" dropped this answer; the log is already cleared
    box.remove();
    conversation.pop();
    addMessage("error", "Sorry — " + err.message);
    if (!input.value) input.value = question;  // ready to send again
  } finally {
    if (inFlight === controller) {
      inFlight = null; busy = false; send.disabled = !ready; input.focus();
    }
  }
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  const question = input.value.trim();
  if (!question || busy) return;
  if (!ready) { statusEl.classList.remove("flash"); void statusEl.offsetWidth; statusEl.classList.add("flash"); return; }
  input.value = ""; input.style.height = "";
  ask(question);
});

input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
});
input.addEventListener("input", () => { input.style.height = ""; input.style.height = Math.min(input.scrollHeight, 160) + "px"; });

document.getElementById("new").addEventListener("click", () => {
  if (inFlight) inFlight.abort();  // stops the stream; the server stops generating when the client leaves
  inFlight = null; busy = false; send.disabled = !ready;
  messages = [];
  log.replaceChildren();
  addMessage("tutor system", "New conversation — ask me anything about machine learning.");
  input.focus();
});

function setStatus(kind, text) { statusEl.className = "status " + kind; statusEl.textContent = text; }

async function health() {
  try {
    const h = await (await fetch("/health", { cache: "no-store" })).json();
    ready = h.status === "ready";
    if (ready) setStatus("ready", "ready");
    else if (h.status === "failed") {
      setStatus("down", "failed to load");
      addMessage("error", "The tutor failed to load its models: " + h.error + " — fix it and restart the server.");
    } else { setStatus("loading", "loading models…"); setTimeout(health, 1000); }
  } catch (err) {
    ready = false;
    setStatus("down", "server unreachable");
    setTimeout(health, 3000);
  }
  send.disabled = busy || !ready;
  input.placeholder = ready ? "Ask a question…" : "Waiting for the models to load…";
}
send.disabled = true;
health();
input.focus();

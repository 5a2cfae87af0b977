// The chat page: sends the conversation to /v1/chat/completions (stream: true) and renders the streamed answer,
// then its source entry (or "not in my notes") from the extension fields of the last chunk. No build step, no CDN.
"use strict";

const MODEL = "ohlora-tutor";
const log = document.getElementById("log");
const form = document.getElementById("ask");
const input = document.getElementById("question");
const send = document.getElementById("send");
const statusEl = document.getElementById("status");
let messages = [];  // the conversation so far, OpenAI shape
let busy = false;

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

function scrollDown() { log.scrollTop = log.scrollHeight; }

function addMessage(role, text) {
  const hello = document.getElementById("hello");
  if (hello) hello.remove();
  const box = element("div", "msg " + role);
  const body = element("div", "text", text || "");
  box.appendChild(body);
  log.appendChild(box);
  scrollDown();
  return box;
}

function showSource(box, final) {
  const used = (final.sources || []).find((s) => s.used);
  let el;
  if (used && !final.declined) {
    el = element("details", "source");
    const summary = element("summary");
    summary.append("source: ", element("span", "title", used.title), " ",
      element("span", "score", "(" + used.score.toFixed(3) + ")"));
    if (final.follow_up) summary.appendChild(element("span", "tag", "follow-up"));
    el.appendChild(summary);
    el.appendChild(element("p", "entry", used.text));
  } else {
    el = element("div", "source none", used
      ? "not in my notes — the closest entry (" + used.title + ") does not answer this"
      : "not in my notes — nothing in the concept DB matched this question");
  }
  el.dataset.kind = used && !final.declined ? "source" : "none";
  box.appendChild(el);
  scrollDown();
}

async function ask(question) {
  busy = true; send.disabled = true;
  addMessage("user", question);
  messages.push({ role: "user", content: question });
  const box = addMessage("tutor pending", "");
  const text = box.querySelector(".text");
  let final = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: MODEL, messages: messages, stream: true }),
    });
    if (response.status === 401) {
      const key = prompt("This tutor needs an API key:");
      if (key) localStorage.setItem("ohlora-api-key", key);
      throw new Error("missing or wrong API key — send the question again");
    }
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
        if (delta.content) { text.textContent += delta.content; scrollDown(); }
        if (chunk.choices && chunk.choices[0] && chunk.choices[0].finish_reason) final = chunk;
      }
    }
    if (!final) throw new Error("the answer was cut off — try again");
    text.textContent = final.answer;  // the final text (the guard may have replaced an invented answer)
    box.classList.remove("pending");
    box.dataset.done = "true";
    showSource(box, final);
    messages.push({ role: "assistant", content: final.answer });
  } catch (err) {
    box.remove();
    messages.pop();
    addMessage("error", "Sorry — " + err.message);
  } finally {
    busy = false; send.disabled = false; input.focus();
  }
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  const question = input.value.trim();
  if (!question || busy) return;
  input.value = ""; input.style.height = "";
  ask(question);
});

input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
});
input.addEventListener("input", () => { input.style.height = ""; input.style.height = Math.min(input.scrollHeight, 160) + "px"; });

document.getElementById("new").addEventListener("click", () => {
  messages = [];
  log.replaceChildren();
  addMessage("tutor", "New conversation — ask me anything about machine learning.").classList.add("system");
  input.focus();
});

async function health() {
  try {
    const h = await (await fetch("/health")).json();
    statusEl.className = "status " + (h.status === "ready" ? "ready" : "loading");
    statusEl.textContent = h.status === "ready" ? "ready" : h.status === "failed" ? "failed: " + h.error : "loading models…";
    if (h.status !== "ready" && h.status !== "failed") setTimeout(health, 1000);
  } catch (err) {
    statusEl.className = "status down"; statusEl.textContent = "server unreachable";
    setTimeout(health, 3000);
  }
}
health();
input.focus();

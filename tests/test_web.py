"""Integration: the chat page in a real browser (headless Chromium via Playwright) against `ohlora-rag serve` run as a
subprocess on the real packaged models — a streamed answer with its source, a follow-up, "not in my notes", New chat,
error and loading states, a phone-width layout and Korean text; then SIGTERM stops the server with status 0.

Screenshots go to $OHLORA_SCREENSHOT_DIR when set (the README's docs/chat.png and docs/chat-phone.png come from
`OHLORA_SCREENSHOT_DIR=docs pytest tests/test_web.py`), else to a temporary folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ohlora_rag.build import build_index
from ohlora_rag.config import IndexConfig, Paths

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (Debian: apt-get install chromium)"),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None, reason="the playwright package is not installed"
    ),
]

COSINE = "What is cosine similarity?"
FOLLOW_UP = "how is it computed?"
UNRELATED = "Who won the 2030 World Cup?"
KOREAN = "드롭아웃이 뭐야?"
TIMEOUT_MS = 60_000  # one answer of at most 60 new tokens on a slow CPU

# Counts the distinct texts the streaming tutor bubble shows: more than one means the answer arrived in pieces.
WATCH_STREAM = """() => {
  window.streamTexts = new Set();
  new MutationObserver(() => {
    const t = document.querySelector(".msg.tutor.pending .text");
    if (t && t.textContent) window.streamTexts.add(t.textContent);
  }).observe(document.getElementById("log"), { subtree: true, childList: true, characterData: true });
}"""

# Two different Hangul syllables drawn in the bubble's font: equal pixels mean both are the missing-glyph box.
HANGUL_DRAWN = """(el) => {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 64;
  const g = canvas.getContext("2d");
  g.font = getComputedStyle(el).font;
  const draw = (ch) => { g.clearRect(0, 0, 64, 64); g.fillText(ch, 4, 44); return g.getImageData(0, 0, 64, 64).data.join(); };
  return draw("드") !== draw("롭");
}"""


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> int | None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, e5_folder: Path) -> Iterator[Served]:
    """A home with the repo's concept DB and calibration set, an index built as `build-index` does by default, and
    `python -m ohlora_rag serve` on a free port, ready (models loaded)."""
    paths = Paths(tmp_path_factory.mktemp("webhome"))
    paths.data_dir.mkdir(parents=True)
    for name in ("concepts.csv", "trust_calib.csv"):
        shutil.copy(ROOT / "data" / name, paths.data_dir / name)
    shutil.copytree(e5_folder, paths.base_models_dir / "multilingual-e5-small")  # converted once per session
    config = IndexConfig(
        db=paths.data_dir / "concepts.csv", calibration=paths.data_dir / "trust_calib.csv", progress=False
    )
    assert build_index(config, paths).decision is not None
    port = _free_port()
    log = paths.home / "serve.log"
    command = [sys.executable, "-m", "ohlora_rag", "--home", str(paths.home), "serve", "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as out:
        process = subprocess.Popen([*command, "--max-new-tokens", "60"], stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline, status = time.time() + 180, "not answering"
        while time.time() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(server.url + "/health", timeout=5).json()["status"]
            if status in ("ready", "failed"):
                break
            time.sleep(0.25)
        assert status == "ready", f"server {status} (exit {process.poll()}):\n{server.log_tail()}"
        yield server
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("OHLORA_SCREENSHOT_DIR") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _ask(page: Any, question: str) -> Any:
    """Type the question, press Enter, wait for the answer to finish; the finished tutor bubble."""
    done = page.locator(".msg.tutor[data-done=true]").count()
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.wait_for_function(
        "(n) => document.querySelectorAll('.msg.tutor[data-done=true]').length > n"
        " || document.querySelector('.msg.error')",
        arg=done,
        timeout=TIMEOUT_MS,
    )
    assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").first.inner_text()
    return page.locator(".msg.tutor[data-done=true]").last


def test_chat_streams_answers_with_sources_follow_ups_and_not_in_my_notes(
    served: Served, browser: Any, shots: Path
) -> None:
    page = browser.new_page(viewport={"width": 1000, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(served.url + "/")
    page.wait_for_selector("#status.ready")
    assert page.is_enabled("#send")
    page.evaluate(WATCH_STREAM)

    answer = _ask(page, COSINE)
    streamed = page.evaluate("window.streamTexts.size")
    assert streamed > 1, f"the answer arrived in {streamed} update(s), not streamed"
    text = answer.locator(".text").inner_text()
    assert "cosine" in text.lower()
    source = answer.locator(".source")
    assert source.get_attribute("data-kind") == "source"
    assert "cosine" in source.locator(".title").inner_text().lower()
    assert source.locator(".tag").count() == 0
    entry = source.locator(".entry")
    assert not entry.is_visible()
    source.locator("summary").click()  # the source entry expands to its full text
    assert entry.is_visible() and "cosine" in entry.inner_text().lower()

    answer = _ask(page, FOLLOW_UP)
    source = answer.locator(".source")
    assert source.get_attribute("data-kind") == "source"
    assert "cosine" in source.locator(".title").inner_text().lower()
    assert source.locator(".tag").inner_text() == "follow-up"

    answer = _ask(page, UNRELATED)
    none = answer.locator(".source")
    assert none.get_attribute("data-kind") == "none"
    assert none.is_visible() and none.inner_text().startswith("Not in my notes —")
    assert page.locator(".msg.user").all_inner_texts() == [COSINE, FOLLOW_UP, UNRELATED]
    page.screenshot(path=str(shots / "chat.png"))

    page.click("#new")
    assert page.locator(".msg.user, .msg.tutor[data-done=true], .source").count() == 0
    assert page.locator(".msg").all_inner_texts() == ["New conversation — ask me anything about machine learning."]
    assert errors == []


def test_error_body_and_loading_state_are_shown(served: Served, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    # While /health says "loading": the status says so and a question is not sent.
    page.route("**/health", lambda route: route.fulfill(json={"status": "loading", "error": None}))
    page.goto(served.url + "/")
    page.wait_for_selector("#status.loading")
    assert page.inner_text("#status") == "loading models…"
    assert not page.is_enabled("#send")
    page.fill("#question", COSINE)
    page.press("#question", "Enter")
    assert page.locator(".msg").count() == 0 and page.input_value("#question") == COSINE
    page.unroute("**/health")
    page.wait_for_selector("#status.ready")  # the page keeps polling /health
    assert page.is_enabled("#send")

    # A 4xx JSON error from the real server (an unknown model) is shown as its message; the question comes back.
    def wrong_model(route: Any) -> None:
        body = json.loads(route.request.post_data or "{}")
        route.continue_(post_data=json.dumps({**body, "model": "gpt-4"}))

    page.route("**/v1/chat/completions", wrong_model)
    page.press("#question", "Enter")
    error = page.wait_for_selector(".msg.error", timeout=TIMEOUT_MS)
    assert error.inner_text() == (
        "Sorry — model 'gpt-4' does not exist — use 'ohlora-tutor' (GET /v1/models) (HTTP 404)"
    )
    assert page.input_value("#question") == COSINE and page.is_enabled("#send")


def test_phone_width_and_korean(served: Served, browser: Any, shots: Path) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    page.goto(served.url + "/")
    page.wait_for_selector("#status.ready")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390

    _ask(page, KOREAN)
    question = page.locator(".msg.user").last
    assert question.inner_text() == KOREAN and question.get_attribute("lang") == "ko"
    assert question.locator(".text").evaluate(HANGUL_DRAWN), (
        "Hangul renders as missing-glyph boxes: install a Korean font (Debian: fonts-nanum)"
    )
    _ask(page, COSINE)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.evaluate("document.body.scrollWidth") <= 390
    page.screenshot(path=str(shots / "chat-phone.png"))
    context.close()


def test_sigterm_stops_the_server_with_status_0(served: Served) -> None:
    started = time.time()
    served.process.send_signal(signal.SIGTERM)
    try:
        code = served.process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server still runs 10 s after SIGTERM:\n{served.log_tail()}")
    assert code == 0, served.log_tail()
    assert time.time() - started < 10

"""The server over real HTTP: the official `openai` client (streaming and not), search, health, bad input (4xx with a
JSON body, and the server keeps serving), concurrent answers, a client that leaves mid-stream, auth and limits.
Tiny random-weight models, a real uvicorn server on a free port."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from ohlora_rag.cli import app as cli
from ohlora_rag.config import AskConfig, Paths, ServeConfig
from ohlora_rag.engine import QueryEngine
from ohlora_rag.errors import UsageError
from ohlora_rag.server import MODEL_ID, create_app

PRECISION = "precision : true positives over predicted positives | key idea: few false alarms"


class Server:
    def __init__(self, url: str, engine: QueryEngine, key: str | None) -> None:
        self.url, self.engine, self.key = url, engine, key

    def post(self, path: str, body: object | None = None, raw: bytes | None = None, **headers: str) -> httpx.Response:
        if self.key:
            headers.setdefault("Authorization", f"Bearer {self.key}")
        content = raw if raw is not None else json.dumps(body).encode()
        return httpx.post(self.url + path, content=content, headers={"Content-Type": "application/json", **headers})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(condition: Callable[[], bool], seconds: float = 20, what: str = "the condition") -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"{what} not so after {seconds} s"
        time.sleep(0.02)


def _wait_ready(url: str, seconds: float) -> None:
    def ready() -> bool:
        try:
            return bool(httpx.get(url + "/health").json()["status"] == "ready")
        except httpx.HTTPError:
            return False

    _wait_for(ready, seconds, f"{url} ready")


def _run(config: ServeConfig, engine: QueryEngine) -> Iterator[Server]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(lambda: engine, config), port=config.port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.port}"
    _wait_ready(url, 30)
    try:
        yield Server(url, engine, config.api_key)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def served_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A home with the tiny S-BERT, a built index and the tiny LM: (home, LM folder)."""
    from tests.conftest import make_tiny_lm, make_tiny_sbert, write_concepts

    root = tmp_path_factory.mktemp("serve")
    write_concepts(root / "data" / "concepts.csv")
    (root / "models").mkdir()
    make_tiny_sbert(root / "build").rename(root / "models" / "sbert")
    lm = make_tiny_lm(root)
    mp = pytest.MonkeyPatch()
    mp.setenv("OHLORA_HOME", str(root))
    try:
        assert CliRunner().invoke(cli, ["build-index", "-q"]).exit_code == 0
    finally:
        mp.undo()
    return root, lm


@pytest.fixture(scope="module")
def engine(served_home: tuple[Path, Path]) -> QueryEngine:
    root, lm = served_home
    return QueryEngine.load(AskConfig(base_llm=str(lm), max_new_tokens=12), Paths(root), batch=4)


@pytest.fixture(scope="module")
def server(engine: QueryEngine) -> Iterator[Server]:
    yield from _run(ServeConfig(port=_free_port(), max_body_bytes=200_000), engine)


def test_openai_client_plain_and_streaming(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    messages = [{"role": "user", "content": PRECISION}]
    plain = client.chat.completions.create(model=MODEL_ID, messages=messages)  # type: ignore[arg-type]
    text = plain.choices[0].message.content
    assert text and plain.choices[0].finish_reason in ("stop", "length")
    extra = plain.model_extra or {}
    assert extra["sources"][0]["id"] == "precision" and extra["sources"][0]["used"] is True
    assert plain.usage is not None and plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, stream=True))  # type: ignore[arg-type]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == text  # greedy: the same answer streamed or not
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert (chunks[-1].model_extra or {})["answer"] == text


def test_raw_stream_ends_with_done(server: Server) -> None:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": PRECISION}], "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"] in ("stop", "length")


def test_search_and_health(server: Server, engine: QueryEngine) -> None:
    found = server.post("/v1/search", {"query": PRECISION, "top_k": 2}).json()
    assert found["hits"][0]["id"] == "precision" and len(found["hits"]) == 2
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ready" and health["entries"] == 6 and health["llm"]


def test_follow_up_uses_the_conversation(server: Server) -> None:
    messages = [
        {"role": "user", "content": PRECISION},
        {"role": "assistant", "content": "Precision counts false alarms."},
        {"role": "user", "content": "and how is it computed?"},
    ]
    reply = server.post("/v1/chat/completions", {"model": MODEL_ID, "messages": messages}).json()
    assert reply["follow_up"] is True and reply["sources"][0]["id"] == "precision"


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[]", 400, ""),
    (json.dumps({"model": MODEL_ID}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL_ID, "messages": []}).encode(), 400, "messages: empty"),
    (json.dumps({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, "role"),
    (
        json.dumps({"model": MODEL_ID, "messages": [{"role": "assistant", "content": "hi"}]}).encode(),
        400,
        "last message",
    ),
    (json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "   "}]}).encode(), 400, "empty"),
    (json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * 100_000}]}).encode(), 400, "limit"),
    (json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "does not exist"),
    (
        json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(),
        400,
        "max_tokens",
    ),
    (
        json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}).encode(),
        400,
        "max_tokens",
    ),
    (
        json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(),
        400,
        "temperature",
    ),
    (b'{"model": "ohlora-tutor", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, ""),
    (json.dumps({"model": MODEL_ID, "messages": "hello"}).encode(), 400, "messages"),
    (
        json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "a" * 300_000}]}).encode(),
        413,
        "body over",
    ),
]


@pytest.mark.parametrize(("raw", "status", "message"), BAD)
def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(
    server: Server, raw: bytes, status: int, message: str
) -> None:
    response = server.post("/v1/chat/completions", raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"]
    assert server.post("/v1/search", {"query": PRECISION}).status_code == 200


def test_unknown_path_and_method(server: Server) -> None:
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405


def test_concurrent_answers_are_each_their_own(server: Server, engine: QueryEngine) -> None:
    questions = [PRECISION, "what is recall ?", "what is dropout ?", "who won the cup ?"] * 2
    alone = {
        q: server.post("/v1/chat/completions", _ask(q)).json()["choices"][0]["message"]["content"] for q in questions
    }
    batches_before = len(engine.generator.batches)  # type: ignore[attr-defined]
    with ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(lambda q: server.post("/v1/chat/completions", _ask(q)).json(), questions))
    assert [r["choices"][0]["message"]["content"] for r in replies] == [alone[q] for q in questions]
    sizes = engine.generator.batches[batches_before:]  # type: ignore[attr-defined]
    assert max(sizes) > 1  # some were generated together


def test_a_client_that_leaves_stops_its_generation(server: Server, engine: QueryEngine) -> None:
    batcher = engine.generator
    body = _ask(PRECISION) | {"max_tokens": 1000}
    runs = len(batcher.steps)  # type: ignore[attr-defined]
    full = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()["usage"]["completion_tokens"]
    assert full == 1000  # the random tiny LM never says EOS here: without the client leaving, 1000 steps run
    # a reply ends when its row does, a moment before its batch records its steps: wait for that record, or it
    # would be taken for the next run's
    _wait_for(lambda: len(batcher.steps) > runs)  # type: ignore[attr-defined]
    # each step now takes at least 20 ms, so the whole answer takes 20 s or more: the client's leaving must be seen
    # long before, however busy the machine is (a tiny LM's 1000 steps alone once ended before it was seen in CI)
    hook = batcher.generator.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))  # type: ignore[attr-defined]
    try:
        before = len(batcher.steps)  # type: ignore[attr-defined]
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body | {"stream": True}) as response:
            for line in response.iter_lines():
                if '"content": "' in line and '"role"' not in line:
                    break  # leave after the first piece
        _wait_for(lambda: len(batcher.steps) > before, seconds=60)  # type: ignore[attr-defined]
    finally:
        hook.remove()
    assert batcher.steps[before] < full / 2, batcher.steps[before - 1 :]  # type: ignore[attr-defined]


def test_api_key_and_local_binding(engine: QueryEngine) -> None:
    with pytest.raises(UsageError, match="needs --api-key"):
        ServeConfig(host="0.0.0.0")
    with pytest.raises(UsageError, match="name the origins"):
        ServeConfig(cors_origins=("*",))
    runner = _run(ServeConfig(port=_free_port(), api_key="s3cret"), engine)
    server = next(runner)
    try:
        assert server.post("/v1/search", {"query": "x"}, Authorization="Bearer wrong").status_code == 401
        assert httpx.post(server.url + "/v1/search", json={"query": "x"}).status_code == 401
        assert server.post("/v1/search", {"query": PRECISION}).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200  # health and the page need no key
        cors = httpx.options(
            server.url + "/v1/search",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in cors.headers  # no wildcard CORS
    finally:
        next(runner, None)


def _ask(question: str) -> dict[str, object]:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": question}]}


def test_sigterm_finishes_the_answer_in_flight_then_exits(served_home: tuple[Path, Path]) -> None:
    import os
    import signal
    import subprocess
    import sys

    root, lm = served_home
    port = _free_port()
    command = [sys.executable, "-m", "ohlora_rag", "--home", str(root), "serve", "--port", str(port)]
    process = subprocess.Popen([*command, "--base-llm", str(lm)], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, 60)
        body = _ask(PRECISION) | {"stream": True, "max_tokens": 300}
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not lines:
                    process.send_signal(signal.SIGTERM)  # mid-answer
                lines.append(line)
        data = [x[5:].strip() for x in lines if x.startswith("data:")]
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["usage"]["completion_tokens"] == 300  # finished, not cut off
        assert process.wait(30) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health")
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()

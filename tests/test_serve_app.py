"""`expandlm serve`: the OpenAI-compatible API driven by the `openai` client on a live server, its
errors in OpenAI's shape, the bounded queue, disconnects, and concurrent requests for two domains."""
import json
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from expandlm.serve.app import Catalog, Job, Scheduler, create_app
from expandlm.inference.engine import Sampler
from expandlm.serve.http import HEADER_TIMEOUT_S, header_timed
from expandlm.formats.served import load_served


@contextmanager
def live_server(app, header_timeout_s: float = HEADER_TIMEOUT_S):
    """`app` on a free loopback port, in a thread, with `serve`'s HTTP connections; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           http=header_timed(header_timeout_s)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def app(two_domain_models):
    scheduler = Scheduler(max_batch=4, max_waiting=8, threads=1).start()
    yield create_app(Catalog([load_served(two_domain_models["expand_paths"])]), scheduler)
    scheduler.stop()


@pytest.fixture(scope="module")
def url(app):
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app) as c:
        yield c


STORIES, RECIPES = "expand_paths/stories", "expand_paths/recipes"


def test_models_lists_every_domain_and_auto(client):
    assert [m.id for m in client.models.list().data] == [STORIES, RECIPES, "auto"]


def test_completion_with_the_openai_client(client):
    out = client.completions.create(model=STORIES, prompt="Once upon", max_tokens=12, temperature=0, seed=1)
    choice = out.choices[0]
    assert out.model == STORIES and choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 2
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = client.completions.create(model=STORIES, prompt="Once upon", max_tokens=12, temperature=0, seed=1)
    assert again.choices[0].text == choice.text
    short = client.completions.create(model=STORIES, prompt="Once upon", max_tokens=1, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1


def test_streamed_completion_equals_the_whole_answer(client):
    kw = dict(model=RECIPES, prompt="Banana", max_tokens=30, temperature=0.9, top_p=0.9, seed=3,
              extra_body={"top_k": 20})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_with_auto_routing_says_which_domain_answered(client):
    out = client.chat.completions.create(model="auto", max_tokens=8, temperature=0, seed=0,
                                         messages=[{"role": "user", "content": "give me a recipe for banana bread"}])
    assert out.model == RECIPES
    routing = out.model_extra["routing"]
    assert routing["domain"] == "recipes" and routing["prompt"] == "Banana Bread" and 0 <= routing["confidence"] <= 1
    assert set(routing["scores"]) == {"stories", "recipes"}
    assert out.choices[0].message.content.startswith("Banana Bread")  # the chat template's prompt, then the text
    stream = client.chat.completions.create(model="auto", max_tokens=8, temperature=0, seed=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "give me a recipe for banana bread"}])
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_auto_answers_a_request_no_domain_fits_with_its_best_guess_and_says_so(client):
    out = client.completions.create(model="auto", prompt="asdf qwerty", max_tokens=4, temperature=0, seed=0)
    routing = out.model_extra["routing"]
    assert routing["fits"] is False and "no domain fits" in routing["reason"]
    assert out.model.endswith("/" + routing["domain"])
    ok = client.completions.create(model="auto", prompt="a recipe for soup", max_tokens=4, temperature=0, seed=0)
    assert ok.model_extra["routing"]["fits"] is True


def test_auto_routes_over_the_domains_of_every_folder(two_domain_models, tmp_path):
    """Two folders, one domain each: `auto` routes over both, and the folder that serves the chosen
    domain answers (not only the first folder's domains)."""
    from expandlm.training.expert import ExpertSpec, train_expert
    from expandlm.training.loop import TrainConfig
    from conftest import NANO_STEPS, RECIPES, write_jsonl

    recipes = write_jsonl(tmp_path / "recipes.jsonl", RECIPES)
    train_expert(ExpertSpec(domain="recipes", data=str(recipes), out=str(tmp_path / "recipes"), preset="nano",
                            vocab_size=400, train=TrainConfig(**NANO_STEPS)))
    stories, only_recipes = load_served(two_domain_models["base"]), load_served(tmp_path / "recipes")
    catalog = Catalog([stories, only_recipes])
    assert sorted(catalog.router.domains) == ["recipes", "stories"]
    endpoint, routed = catalog.route("a recipe for tomato soup")
    assert (endpoint.served, endpoint.domain, routed.domain) == (only_recipes, "recipes", "recipes")
    endpoint, routed = catalog.route("tell me a story about a little cat")
    assert (endpoint.served, endpoint.domain) == (stories, "stories")


def test_n_choices_and_stop_strings(client):
    out = client.completions.create(model=STORIES, prompt="The", max_tokens=20, temperature=1.0, seed=4, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2] and len({c.text for c in out.choices}) > 1
    full = client.completions.create(model=STORIES, prompt="The", max_tokens=40, temperature=0).choices[0].text
    cut = next(c for c in full[3:] if c.strip())  # a character that occurs after the start
    stopped = client.completions.create(model=STORIES, prompt="The", max_tokens=40, temperature=0, stop=[cut])
    assert stopped.choices[0].text == full[:full.index(cut)] and stopped.choices[0].finish_reason == "stop"


def test_requests_for_two_domains_at_once_get_what_each_gets_alone(client):
    asks = [dict(model=m, prompt=p, max_tokens=40, temperature=t, seed=7)
            for m, p in ((STORIES, "Once"), (RECIPES, "Soup")) for t in (0.0, 1.0)]
    alone = [client.completions.create(**kw).choices[0].text for kw in asks]
    together, barrier = [None] * len(asks), threading.Barrier(len(asks))

    def ask(i):
        barrier.wait()
        together[i] = client.completions.create(**asks[i]).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "expand_paths/stories", "prompt": "x"', 400, None),            # malformed JSON
    ({"model": "poems", "prompt": "x"}, 404, "model"),                          # unknown model
    ({"model": STORIES, "prompt": "x" * 400}, 400, "prompt"),                   # longer than the context
    ({"model": STORIES, "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"model": STORIES, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": STORIES, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": STORIES, "prompt": "x", "n": "2"}, 400, "n"),
    ({"model": STORIES, "prompt": 5}, 400, "prompt"),
    ({"prompt": "x"}, 400, "model"),
])
def test_bad_input_gets_a_4xx_in_openai_shape_and_the_server_keeps_serving(http, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    error = _error(http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"}),
                   status)
    assert error["param"] == param or (param and error["param"].startswith(param))
    ok = http.post("/v1/completions", json={"model": STORIES, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_needs_a_user_message(http):
    error = _error(http.post("/v1/chat/completions", json={"model": STORIES, "messages": [
        {"role": "system", "content": "be brief"}]}), 400)
    assert "user message" in error["message"]


def test_a_full_queue_answers_429(app, http):
    scheduler = app.state.scheduler
    served = app.state.catalog.get(STORIES)
    scheduler.set_paused(True)
    try:
        import asyncio
        loop = asyncio.new_event_loop()
        fill = [Job(served, [0, 3], Sampler(), 1, [], asyncio.Queue(), loop) for _ in range(scheduler.max_waiting)]
        scheduler.submit(fill)
        error = _error(http.post("/v1/completions", json={"model": STORIES, "prompt": "x"}), 429)
        assert error["code"] == "queue_full"
        for job in fill:
            job.cancelled = True
    finally:
        scheduler.set_paused(False)
    ok = http.post("/v1/completions", json={"model": STORIES, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def slow_decoding(app, monkeypatch) -> list[int]:
    """Each decode step of STORIES takes 0.05 s more, slow enough that a 120-token request cannot
    finish before its client leaves; the list counts the steps."""
    engine = app.state.scheduler._engine(app.state.catalog.get(STORIES))
    steps, decode = [], engine.decode

    def slow_decode(slots, tokens):
        steps.append(len(slots))
        time.sleep(0.05)
        return decode(slots, tokens)

    monkeypatch.setattr(engine, "decode", slow_decode)
    return steps


def assert_slots_freed(client: httpx.Client, steps: list[int]) -> None:
    deadline = time.monotonic() + 30
    while client.get("/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = client.get("/health").json()
    assert health["running"] == 0 and health["waiting"] == 0
    assert len(steps) < 100  # it left its slot long before its 120 tokens


def test_a_client_that_disconnects_mid_stream_frees_its_slot(app, url, monkeypatch):
    steps = slow_decoding(app, monkeypatch)
    body = {"model": STORIES, "prompt": "x", "max_tokens": 120, "temperature": 1.0, "top_k": 1, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the stream has begun; leave mid-way
        assert_slots_freed(c, steps)


@pytest.mark.parametrize("engine", ["torch", "hf"])
def test_every_engine_serves_the_same_greedy_tokens(app, http, engine):
    other = Scheduler(engine=engine, max_batch=2, threads=1).start()
    try:
        with TestClient(create_app(app.state.catalog, other)) as c:
            for model in (STORIES, RECIPES):
                body = {"model": model, "prompt": "The", "max_tokens": 30, "temperature": 0}
                assert c.post("/v1/completions", json=body).json()["choices"] == \
                    http.post("/v1/completions", json=body).json()["choices"]
    finally:
        other.stop()


def test_a_truncated_model_file_is_one_error_naming_it(two_domain_models, tmp_path):
    import shutil

    from expandlm.errors import UserError
    from expandlm.formats.served import load_served

    for name in ("base", "lora"):
        folder = shutil.copytree(two_domain_models[name], tmp_path / name)
        weights = next(folder.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
        with pytest.raises(UserError, match=rf"^{weights}: .*truncated or damaged"):
            load_served(folder)


# -- faults and abuse (issue 20): each was a freeze, a plain-text 500 or a missing limit before ----------

def test_a_long_request_is_refused_and_reading_one_leaves_the_server_free(app, http, url, monkeypatch):
    from expandlm.routing.router import MAX_REQUEST_CHARS

    huge = {"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "a" + " " * 72_000 + "b"}]}
    error = _error(http.post("/v1/chat/completions", json=huge), 400)
    assert error["code"] == "request_too_long" and error["param"] == "messages" and str(MAX_REQUEST_CHARS) in error["message"]
    start = time.perf_counter()  # within the limit, read in linear time (before: about 3 s)
    long = {"model": STORIES, "max_tokens": 3, "messages": [{"role": "user", "content": "a" + " " * 16_000 + "b"}]}
    assert http.post("/v1/chat/completions", json=long).status_code in (200, 400)
    assert time.perf_counter() - start < 1.0
    catalog, route = app.state.catalog, app.state.catalog.route

    def slow_route(text):  # routing a request takes time; the server answers others meanwhile
        time.sleep(1.5)
        return route(text)

    monkeypatch.setattr(catalog, "route", slow_route)
    body = {"model": "auto", "prompt": "a recipe for soup", "max_tokens": 2}
    routed = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json=body, timeout=30))
    routed.start()
    time.sleep(0.3)
    assert httpx.get(url + "/health", timeout=0.5).status_code == 200  # before: a timeout
    routed.join()


def test_stop_strings_are_found_and_held_back_as_before_in_linear_time():
    import random

    from expandlm.serve.app import StopStrings

    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text, matcher = "", StopStrings(stops)
        while True:
            new = "".join(rng.choice("abc") for _ in range(rng.randint(1, 3)))
            cut, text = matcher.feed(new), text + new
            found = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
            assert cut == found, (stops, text)
            if cut is not None or len(text) > 40:
                break
            hold = max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
            assert matcher.hold == hold, (stops, text)
    start = time.perf_counter()
    matcher = StopStrings(["a" * 256] * 4)
    for _ in range(2000):
        assert matcher.feed("a" * 3 + "b") is None
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("stop, status", [(["x" * 257], 400), (["a", "b", "c", "d", "e"], 400), ("x" * 257, 400),
                                          (["x" * 256] * 4, 200)])
def test_stop_strings_are_bounded(http, stop, status):
    response = http.post("/v1/completions", json={"model": STORIES, "prompt": "x", "max_tokens": 2, "stop": stop})
    if status == 400:
        assert _error(response, 400)["param"] == "stop"
    else:
        assert response.status_code == 200


def test_an_empty_stop_string_stops_nothing(http):
    body = {"model": STORIES, "prompt": "The", "max_tokens": 10, "temperature": 0}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    for stop in ("", [""]):
        assert http.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0] == plain


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": -2**63 - 1}, "seed"),
    ("/v1/completions", {"prompt": "a \ud800 b"}, "prompt"),
    ("/v1/completions", {"prompt": ["\udfff"]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages"),
])
def test_what_was_a_plain_500_is_a_400_in_openai_shape(http, path, body, param):
    response = http.post(path, content=json.dumps({"model": STORIES, "max_tokens": 2, **body}),
                         headers={"Content-Type": "application/json"})
    assert _error(response, 400)["param"].startswith(param)


def test_seeds_of_the_64_bit_range_and_text_parts_are_accepted(http):
    for seed in (2**63 - 1, -2**63):
        body = {"model": STORIES, "prompt": "x", "max_tokens": 2, "seed": seed, "n": 2}
        assert http.post("/v1/completions", json=body).status_code == 200
    parts = [{"type": "text", "text": "a story about "}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "a cat"}]
    out = http.post("/v1/chat/completions", json={"model": STORIES, "max_tokens": 2, "temperature": 0,
                                                  "messages": [{"role": "user", "content": parts}]})
    assert out.json()["choices"][0]["message"]["content"].startswith("Once upon a time, there was a cat.")


def test_n_beyond_the_queue_is_a_400_and_a_full_queue_says_when_to_retry(app, http):
    error = _error(http.post("/v1/completions", json={"model": STORIES, "prompt": "x", "n": 9}), 400)
    assert error["param"] == "n" and "8" in error["message"]
    scheduler, served = app.state.scheduler, app.state.catalog.get(STORIES)
    scheduler.set_paused(True)
    try:
        import asyncio
        fill = [Job(served, [0, 3], Sampler(), 1, [], asyncio.Queue(), asyncio.new_event_loop())
                for _ in range(scheduler.max_waiting)]
        scheduler.submit(fill)
        response = http.post("/v1/completions", json={"model": STORIES, "prompt": "x"})
        assert _error(response, 429)["code"] == "queue_full" and response.headers["Retry-After"] == "1"
        for job in fill:
            job.cancelled = True
    finally:
        scheduler.set_paused(False)


def test_a_body_over_the_size_limit_is_a_413(http):
    from expandlm.serve.app import MAX_BODY_BYTES

    body = json.dumps({"model": STORIES, "prompt": "x" * MAX_BODY_BYTES}).encode()
    declared = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    chunked = http.post("/v1/completions", content=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                        headers={"Content-Type": "application/json"})  # no length: counted as it comes
    for response in (declared, chunked):
        error = _error(response, 413)
        assert str(MAX_BODY_BYTES) in error["message"] and error["code"] == "413"


def test_a_body_that_comes_too_slowly_is_a_408(app):
    import socket

    with live_server(create_app(app.state.catalog, app.state.scheduler, body_timeout_s=0.5)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\": ")  # and then nothing
            start, answer = time.monotonic(), b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert set(error) == {"message", "type", "param", "code"} and "0.5 s" in error["message"]


def test_a_connection_whose_headers_never_finish_is_closed(app):
    """Half a request header and then nothing was held open for ever (still open after 70 s, issue 30)."""
    import socket

    with live_server(app, header_timeout_s=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as half, \
                socket.create_connection((host, int(port)), timeout=10) as whole:
            half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")  # and then nothing
            whole.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert whole.recv(4096).startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            assert half.recv(4096) == b""  # closed by the server (a recv timeout would raise instead)
            assert time.monotonic() - start < 5


def test_a_client_that_abandons_a_whole_answer_frees_its_slot(app, url, monkeypatch):
    steps = slow_decoding(app, monkeypatch)
    body = {"model": STORIES, "prompt": "x", "max_tokens": 120, "temperature": 1.0, "top_k": 1}
    with httpx.Client(base_url=url, timeout=30) as c:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            c.post("/v1/completions", json=body, timeout=0.5)
        assert_slots_freed(c, steps)

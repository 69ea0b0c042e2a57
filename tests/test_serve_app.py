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

from expandlm.serve.app import create_app
from expandlm.serve.catalog import Catalog
from expandlm.serve.scheduler import Job, Scheduler
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


API_KEY = "sk-expandlm-test"


@pytest.fixture(scope="module")
def keyed_app(app):
    """The same models and scheduler behind `--api-key`."""
    return create_app(app.state.catalog, app.state.scheduler, api_keys=("another-key", API_KEY))


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


def test_models_lists_every_domain_its_bare_names_and_auto(client):
    listed = client.models.list().data
    assert [m.id for m in listed] == [STORIES, RECIPES, "stories", "recipes", "auto"]  # every id that answers
    alias = next(m for m in listed if m.id == "stories")
    assert alias.alias_of == STORIES and alias.root.endswith("expand_paths")
    assert client.completions.create(model="stories", prompt="Once", max_tokens=2, temperature=0).model == STORIES


def test_a_served_model_name_replaces_the_folders_name(app):
    from expandlm.errors import UserError

    served = app.state.catalog.models
    assert list(Catalog(served, ["demo"]).endpoints) == ["demo/stories", "demo/recipes"]
    for names, says in [(["a", "b"], r"2 name\(s\) for 1 model folder"), (["x/y"], "without '/'"), (["auto"], "not 'auto'")]:
        with pytest.raises(UserError, match=says):
            Catalog(served, names)


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
    # within the limit, answered (its reading is linear: test_routing_router.py)
    long = {"model": STORIES, "max_tokens": 3, "messages": [{"role": "user", "content": "a" + " " * 16_000 + "b"}]}
    assert http.post("/v1/chat/completions", json=long).status_code in (200, 400)
    catalog, route = app.state.catalog, app.state.catalog.route
    started, release = threading.Event(), threading.Event()

    def slow_route(text):  # routing a request takes time; the server answers others meanwhile
        started.set()
        release.wait(60)
        return route(text)

    monkeypatch.setattr(catalog, "route", slow_route)
    body = {"model": "auto", "prompt": "a recipe for soup", "max_tokens": 2}
    routed = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json=body, timeout=90))
    routed.start()
    assert started.wait(30)  # the request is being read
    try:  # on the event loop, reading it would hold /health until it is released: after this answer
        assert httpx.get(url + "/health", timeout=30).status_code == 200
    finally:
        release.set()
        routed.join()


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
    from expandlm.serve.http import MAX_BODY_BYTES

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


def test_with_an_api_key_v1_needs_it_and_health_and_the_page_stay_open(keyed_app):
    from expandlm.serve.http import MAX_BODY_BYTES

    with live_server(keyed_app) as url:
        for key in (None, "sk-wrong", API_KEY[:-1]):
            openai_client = openai.OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                openai_client.models.list()
        keyed = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
        assert STORIES in {m.id for m in keyed.models.list().data}
        text = keyed.completions.create(model=STORIES, prompt="Once", max_tokens=4, temperature=0).choices[0].text
        assert text
        with httpx.Client(base_url=url) as http:
            missing = http.post("/v1/completions", json={"model": STORIES, "prompt": "x"})
            error = _error(missing, 401)
            assert "Authorization: Bearer" in error["message"] and missing.headers["www-authenticate"] == "Bearer"
            wrong = _error(http.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
            assert wrong["code"] == "invalid_api_key" and "nope" not in wrong["message"]  # a key is never echoed
            assert _error(http.get("/v1/models", headers={"Authorization": API_KEY}), 401)  # no scheme
            assert http.get("/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
            assert http.get("/health").status_code == 200 and http.get("/").status_code == 200
            # refused before the body is read: no upload for a client without the key
            big = http.post("/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1),
                            headers={"Content-Type": "application/json"})
            assert big.status_code == 401


@pytest.mark.parametrize("path, body, says, param", [
    ("/v1/completions", {"model": STORIES, "prompt": 5}, "prompt: expected a string, a list of strings, a list of token ids",
     "prompt"),
    ("/v1/completions", {"model": STORIES, "prompt": "x", "stop": 5}, "stop: Input should be a valid string or", "stop"),
    ("/v1/completions", {"model": STORIES, "prompt": [1, "a"]}, "prompt: expected a string, a list of strings", "prompt"),
    ("/v1/completions", {"model": STORIES, "prompt": ["a"] * 17}, "prompt: at most 16 prompts in one request", "prompt"),
    ("/v1/chat/completions", {"model": STORIES, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs: top_logprobs needs logprobs set to true", "top_logprobs"),
    ("/v1/completions", {"model": STORIES, "prompt": "x", "logprobs": 21}, "logprobs: Input should be less than or "
     "equal to 20", "logprobs"),
    ("/v1/chat/completions", {"model": STORIES, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content.0: a text part needs 'text', a string", "messages.0.content.0"),
])
def test_a_400_names_the_field_as_the_request_does_not_pydantics_internals(http, path, body, says, param):
    error = _error(http.post(path, json=body), 400)
    assert says in error["message"] and error["param"] == param
    assert "function-after" not in error["message"] and "[" not in error["message"] and "Value error" not in error["message"]


# -- logprobs, token-id prompts, /metrics -------------------------------------------------------------

def _first_token_log_probs(app, model_id: str, prompt: str):
    """The model's own log-softmax over the token after `prompt`, as a forward pass gives it."""
    import torch
    from expandlm.inference.generate import request_ids
    endpoint = app.state.catalog.get(model_id)
    ids = request_ids(endpoint.tokenizer, endpoint.served.domain(endpoint.domain), prompt)
    with torch.no_grad():
        logits = endpoint.served.for_domain(endpoint.domain)(torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.float(), -1), endpoint.tokenizer


def test_completion_logprobs_are_the_models_own_and_stream_as_they_answer(app, client):
    kw = dict(model=STORIES, prompt="Once upon", max_tokens=10, temperature=0, logprobs=3)
    out = client.completions.create(**kw).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert "".join(lp.tokens) == out.text and lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and top[token] == chosen == max(top.values())  # greedy: the likeliest
        assert 3 <= len(top) <= 4 and all(v <= 0 for v in top.values())
    expected, tokenizer = _first_token_log_probs(app, STORIES, "Once upon")
    best = expected.topk(3)
    assert lp.token_logprobs[0] == pytest.approx(float(best.values[0]), abs=1e-4)
    assert {tokenizer.decode([i]) for i in best.indices.tolist()} <= set(lp.top_logprobs[0])
    streamed = list(client.completions.create(stream=True, **kw))
    parts = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset
    assert client.completions.create(model=STORIES, prompt="Once", max_tokens=3).choices[0].logprobs is None
    only = client.completions.create(**{**kw, "logprobs": 0}).choices[0].logprobs
    assert only.token_logprobs == lp.token_logprobs and all(len(top) == 1 for top in only.top_logprobs)


def test_chat_logprobs_in_openais_shape(client):
    kw = dict(model=STORIES, max_tokens=8, temperature=0, messages=[{"role": "user", "content": "a story"}])
    whole = client.chat.completions.create(logprobs=True, top_logprobs=2, **kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 8 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.bytes == list(c.token.encode()) and c.logprob == c.top_logprobs[0].logprob for c in content)
    plain = client.chat.completions.create(logprobs=True, **kw).choices[0].logprobs.content
    assert [c.logprob for c in plain] == [c.logprob for c in content] and all(c.top_logprobs == [] for c in plain)
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(stream=True, logprobs=True, **kw)
                if c.choices and c.choices[0].logprobs]
    assert [c.token for part in streamed for c in part.content] == [c.token for c in content]
    assert client.chat.completions.create(**kw).choices[0].logprobs is None


def test_prompts_as_token_ids_and_lists_of_prompts(app, client, http):
    from expandlm.inference.generate import request_ids
    endpoint = app.state.catalog.get(STORIES)
    ids = request_ids(endpoint.tokenizer, endpoint.served.domain("stories"), "Once upon")
    kw = dict(model=STORIES, max_tokens=8, temperature=0)
    text = client.completions.create(prompt="Once upon", **kw)
    by_ids = client.completions.create(prompt=ids, **kw)
    assert by_ids.choices[0].text == text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    other = client.completions.create(prompt="The dog", **kw).choices[0].text
    both = client.completions.create(prompt=["Once upon", "The dog"], n=2, seed=5, **{**kw, "temperature": 0})
    assert [c.index for c in both.choices] == [0, 1, 2, 3]  # prompt p's i-th choice: p·n + i
    assert [c.text for c in both.choices] == [text.choices[0].text] * 2 + [other] * 2
    assert both.usage.prompt_tokens == 2 * text.usage.prompt_tokens + 2 * client.completions.create(
        prompt="The dog", **kw).usage.prompt_tokens
    lists = client.completions.create(prompt=[ids, ids[:2]], **kw)
    assert lists.choices[0].text == text.choices[0].text and len(lists.choices) == 2
    vocab, context = endpoint.vocab_size, endpoint.context
    for body, param, says in [
        ({"prompt": [0, vocab]}, "prompt", f"Token id {vocab} is outside the vocabulary"),
        ({"prompt": [1] * context}, "prompt", "maximum context length"),
        ({"prompt": [3, 4], "model": "auto"}, "prompt", "'auto' routes a request by its text"),
        ({"prompt": ["a", "b"], "model": "auto"}, "prompt", "'auto' routes one request"),
        ({"prompt": ["x"] * 5, "n": 2}, "n", "10 sequences"),
    ]:
        error = _error(http.post("/v1/completions", json={"model": STORIES, "max_tokens": 2, **body}), 400)
        assert error["param"] == param and says in error["message"], error


def _scrape(http) -> dict:
    """/metrics read with Prometheus' own parser: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_count_tokens_requests_and_latencies_in_prometheus_format(http, keyed_app):
    before = _scrape(http)
    out = http.post("/v1/completions", json={"model": STORIES, "prompt": "Once", "max_tokens": 5,
                                             "temperature": 0, "ignore_eos": True, "n": 2}).json()
    after = _scrape(http)
    grew = lambda name, labels=(): after[(name, labels)] - before.get((name, labels), 0)  # noqa: E731
    assert grew("expandlm:prompt_tokens_total") == out["usage"]["prompt_tokens"]
    assert grew("expandlm:generation_tokens_total") == out["usage"]["completion_tokens"] == 10
    assert grew("expandlm:request_success_total", (("finished_reason", "length"),)) == 2
    assert grew("expandlm:time_to_first_token_seconds_count") == grew("expandlm:e2e_request_latency_seconds_count") == 2
    assert after[("expandlm:num_requests_running", ())] == after[("expandlm:num_requests_waiting", ())] == 0
    with TestClient(keyed_app) as keyed:  # open, as /health is, behind --api-key
        assert keyed.get("/metrics").status_code == 200

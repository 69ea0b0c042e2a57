"""The attacks of issue 20 ("Faults and abuse", 1-5) replayed on a live `expandlm serve`, on loopback.

It writes two random-weights models to a temp folder (serving faults do not depend on the weights):
`stories` (the base preset, so that an abandoned answer takes seconds) and `abuse` (tiny), a user's
domain whose spec has `verbatim: '(a+)+$'`, and starts one server for each (`--max-batch 1 --max-waiting 8 --threads 1`). Each attack is sent with a
client timeout (`--cap`, seconds) while a second client asks /health every 0.25 s; a row says the
status code (or the client's timeout), the seconds the attack took, and whether /health always
answered within 1 s meanwhile. A server that does not answer /health after an attack is restarted, so
one freeze does not spill into the next row. Bounded: one request per attack, each capped in time.

The server's code is the one on PYTHONPATH (default: this checkout), so the same file measures
another checkout's code too:

    python benchmarks/abuse.py --json /tmp/after.json
    PYTHONPATH=/tmp/before python benchmarks/abuse.py --json /tmp/before.json
    python benchmarks/abuse.py --table /tmp/before.json /tmp/after.json   # the two side by side
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT))
CODE = os.environ.get("PYTHONPATH") or str(ROOT)  # the expandlm the servers run
SLOW_BODY_CAP = 35.0  # the slow-body attack waits past the server's 30 s body timeout


def write_models(tmp: Path) -> dict[str, Path]:
    from expandlm.domains import get_domain, save_specs
    from expandlm.data.tokenizer import bytes_tokenizer
    from expandlm.model.llama import build_model, get_preset
    from expandlm.records import ModelCard
    from expandlm.run_folder import RunFolder

    spec = tmp / "abuse.yaml"  # a user's domain whose request regex backtracks exponentially in `re`
    spec.write_text("name: abuse\nrequest: {verbatim: '(a+)+$'}\n")
    get_domain(str(spec))
    out = {}
    for name, preset, domain in (("stories", "base", "stories"), ("abuse", "tiny", "abuse")):
        tok = bytes_tokenizer([f"<|{domain}|>"] if domain == "abuse" else [])
        folder = RunFolder(tmp / name)
        folder.save(build_model(get_preset(preset), tok).save_pretrained)
        folder.save(tok.save_pretrained)
        folder.write_card(ModelCard(domains=[domain], preset=preset))
        save_specs(folder.path, [get_domain(domain)])
        out[name] = folder.path
    return out


class Server:
    """`expandlm serve FOLDER` on a free loopback port, restartable."""

    def __init__(self, folder: Path):
        self.folder, self.process, self.url = folder, None, ""

    def start(self) -> "Server":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": CODE, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "expandlm", "serve", str(self.folder), "--port",
                                         str(port), "--max-batch", "1", "--max-waiting", "8", "--threads", "1"],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        cwd=self.folder.parent)  # not a checkout: `-m` would import its code
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server for {self.folder} exited ({self.process.returncode})")
            if self.healthy(1.0):
                return self
            time.sleep(0.2)
        raise SystemExit(f"the server for {self.folder} did not answer /health within 120 s")

    def healthy(self, timeout: float) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def probe_health(server: Server, stop: threading.Event, late: list) -> None:
    """Ask /health every 0.25 s until `stop`; note each answer that took over 1 s or never came."""
    while not stop.is_set():
        t0 = time.perf_counter()
        if not server.healthy(1.0) or time.perf_counter() - t0 > 1.0:
            late.append(time.perf_counter() - t0)
        stop.wait(0.25)


def post(server: Server, path: str, body, cap: float) -> str:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"},
                       timeout=cap)
    except httpx.TimeoutException:
        return "no answer"
    except httpx.HTTPError as e:
        return type(e).__name__
    extra = f" Retry-After: {r.headers['Retry-After']}" if "Retry-After" in r.headers else ""
    shape = "" if r.headers.get("content-type", "").startswith("application/json") else " (plain text)"
    if r.status_code == 200 and path.endswith("/completions"):
        choice = r.json()["choices"][0]
        text = choice.get("text", (choice.get("message") or {}).get("content"))
        extra += f" ({len(text)} chars)"
    return f"{r.status_code}{shape}{extra}"


def slow_body(server: Server, cap: float) -> str:
    """10 bytes of a declared 100-byte body, then silence."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=cap) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\": ")
        try:
            answer = s.recv(4096)
        except socket.timeout:
            return "no answer"
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"


def abandon(server: Server, cap: float) -> str:
    """A whole (non-streaming) answer of 4 sequences to the end of the context, left after 0.5 s; the
    row's seconds are those until the server's slots are free again."""
    body = {"model": "stories", "prompt": "x", "n": 4, "temperature": 1.0, "ignore_eos": True}
    try:
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
        return "answered before the client left"
    except httpx.TimeoutException:
        pass
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        load = httpx.get(server.url + "/health", timeout=5).json()
        if load["running"] == 0 and load["waiting"] == 0:
            return "freed"
        time.sleep(0.05)
    return "still busy"


def full_queue(server: Server, cap: float) -> str:
    """A request while 8 sequences fill the queue (max-batch 1, max-waiting 8): a 429, with Retry-After?"""
    body = {"model": "stories", "prompt": "x", "n": 8, "temperature": 1.0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=cap) as c, c.stream("POST", "/v1/completions", json=body):
        return post(server, "/v1/completions", {"model": "stories", "prompt": "x", "max_tokens": 2, "n": 2}, cap)


def attacks():
    chat = "/v1/chat/completions"
    text = "/v1/completions"
    surrogate = '{"model": "stories", "max_tokens": 2, "prompt": "a \\ud800 b"}'.encode()
    msg_surrogate = '{"model": "stories", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud800"}]}'.encode()

    def message(content):
        return {"model": "stories", "max_tokens": 3, "messages": [{"role": "user", "content": content}]}

    return [
        ("1. 72 KB chat message", "stories", lambda s, cap: post(s, chat, message("a" + " " * 72_000 + "b"), cap)),
        ("1. 16 KB chat message (within the limit)", "stories",
         lambda s, cap: post(s, chat, message("a" + " " * 16_000 + "b"), cap)),
        ("2. 4 stops of 400,000 chars", "stories",
         lambda s, cap: post(s, text, {"model": "stories", "prompt": "x", "max_tokens": 3, "stop": ["x" * 400_000] * 4},
                             cap)),
        ("2. 4 stops of 200,000 chars (body < 1 MiB)", "stories",
         lambda s, cap: post(s, text, {"model": "stories", "prompt": "x", "max_tokens": 3, "stop": ["x" * 200_000] * 4},
                             cap)),
        ("3. verbatim '(a+)+$', 128-byte request", "abuse",
         lambda s, cap: post(s, chat, {**message("a" * 127 + "b"), "model": "abuse"}, cap)),
        ("4. seed 2**64", "stories", lambda s, cap: post(s, text, {"model": "stories", "prompt": "x", "max_tokens": 2,
                                                                   "seed": 2**64}, cap)),
        ("4. lone surrogate in a prompt", "stories", lambda s, cap: post(s, text, surrogate, cap)),
        ("4. lone surrogate in a message", "stories", lambda s, cap: post(s, chat, msg_surrogate, cap)),
        ("4. content part text: 5", "stories",
         lambda s, cap: post(s, chat, message([{"type": "text", "text": 5}]), cap)),
        ("4. content part text: null", "stories",
         lambda s, cap: post(s, chat, message([{"type": "text", "text": None}]), cap)),
        ("5. 2 MiB body", "stories", lambda s, cap: post(s, text, {"model": "stories", "prompt": "x" * (2 << 20)}, cap)),
        ("5. body sent slowly (10 of 100 bytes)", "stories", lambda s, cap: slow_body(s, SLOW_BODY_CAP)),
        ("5. n=16 on a queue of 8, idle server", "stories",
         lambda s, cap: post(s, text, {"model": "stories", "prompt": "x", "max_tokens": 2, "n": 16}, cap)),
        ("5. request on a full queue", "stories", full_queue),
        ("5. abandoned whole answer (n=4, to the context)", "stories", abandon),
        ("5. stop: \"\"", "stories", lambda s, cap: post(s, text, {"model": "stories", "prompt": "Once", "max_tokens": 8,
                                                                   "temperature": 0, "stop": ""}, cap)),
    ]


def run(cap: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: Server(folder).start() for name, folder in write_models(Path(tmp)).items()}
        try:
            for name, target, attack in attacks():
                server = servers[target]
                stop, late = threading.Event(), []
                prober = threading.Thread(target=probe_health, args=(server, stop, late), daemon=True)
                prober.start()
                t0 = time.perf_counter()
                status = attack(server, cap)
                seconds = time.perf_counter() - t0
                stop.set()
                prober.join()
                limit = SLOW_BODY_CAP if "slowly" in name else cap
                shown = f">{limit:g}" if status in ("no answer", "still busy") else f"{seconds:.2f}"
                rows.append({"attack": name, "status": status, "seconds": shown, "health within 1 s": not late})
                print(rows[-1], flush=True)
                if not server.healthy(2.0):  # frozen: a fresh server for the next attack
                    server.stop()
                    server.start()
        finally:
            for server in servers.values():
                server.stop()
    return rows


def table(runs: dict[str, list[dict]]) -> str:
    names = list(runs)
    head = "| attack | " + " | ".join(f"{n}: status | {n}: s | {n}: /health ≤ 1 s" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(names))]
    for i, row in enumerate(runs[names[0]]):
        cells = [c for n in names for c in (runs[n][i]["status"], runs[n][i]["seconds"],
                                            "yes" if runs[n][i]["health within 1 s"] else "no")]
        lines.append(f"| {row['attack']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cap", type=float, default=20.0, help="client timeout of an attack, seconds")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print these runs' rows side by side; run nothing")
    args = p.parse_args()
    if args.table:
        print(table({Path(f).stem: json.loads(Path(f).read_text()) for f in args.table}))
        return
    rows = run(args.cap)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table({"this run": rows}))


if __name__ == "__main__":
    main()

"""Load test of `expandlm serve` on loopback: N concurrent streaming clients, bounded in requests and time.

It starts `expandlm serve` as a subprocess on a free 127.0.0.1 port (a model folder given with --model,
else a random-weights model of --preset written to a temp folder: serving speed does not depend on
the weights), waits for /health, and runs `--clients` asyncio clients that each send streaming
completions one after another until `--requests` have been sent or `--max-seconds` have passed. Every
request asks for `--max-tokens` tokens (`ignore_eos`, vLLM's extension, so every request generates
the same number). It reports requests/s, generated tokens/s, p50/p99 time to first token and total
latency, and errors, for each `--max-batch` setting of the server (1: no batching), then stops the
server it started.

    python benchmarks/load_test.py                                   # tiny preset, 8 clients, batch 1 and 8
    python benchmarks/load_test.py --model runs/demo/stories --clients 16 --requests 128
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from expandlm.atomic import write_json, write_text  # noqa: E402
from expandlm.studies.report import markdown_table  # noqa: E402


def random_model(preset: str, out: Path) -> Path:
    from expandlm.model.llama import build_model, get_preset
    from expandlm.run_folder import RunFolder
    from expandlm.data.tokenizer import bytes_tokenizer

    tok = bytes_tokenizer()
    folder = RunFolder(out)
    folder.save(build_model(get_preset(preset), tok).save_pretrained)
    folder.save(tok.save_pretrained)
    folder.write_card({"domains": ["stories"], "strategy": "scratch", "preset": preset})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, max_batch: int, engine: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "expandlm", "serve", str(model), "--port", str(port),
                               "--max-batch", str(max_batch), "--threads", "1", "--engine", engine,
                               "--max-waiting", "1024"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not answer /health within 120 s")


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"error": f"{response.status_code} {response.text[:200]}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter() - t0
    return {"ttft": first, "latency": time.perf_counter() - t0, "tokens": tokens}


async def load(url: str, model_id: str, clients: int, requests: int, max_seconds: float, max_tokens: int) -> dict:
    body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.8,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    results, sent = [], 0
    start = time.perf_counter()

    async def client_loop(client):
        nonlocal sent
        while sent < requests and time.perf_counter() - start < max_seconds:
            sent += 1
            try:
                results.append(await one_request(client, {**body, "seed": sent}))
            except httpx.HTTPError as e:
                results.append({"error": f"{type(e).__name__}: {e}"})

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=max_seconds + 60, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    pct = lambda key, q: round(float(np.percentile([r[key] for r in ok if r[key] is not None], q)) * 1000, 1) if ok else None  # noqa: E731
    return {"requests": len(results), "errors": len(results) - len(ok), "seconds": round(wall, 2),
            "requests/s": round(len(ok) / wall, 2), "generated tok/s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "ttft p50 ms": pct("ttft", 50), "ttft p99 ms": pct("ttft", 99),
            "latency p50 ms": pct("latency", 50), "latency p99 ms": pct("latency", 99),
            "error samples": sorted({r["error"] for r in results if "error" in r})[:3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model folder (default: a random-weights model of --preset)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=64, help="requests in all (the test stops after them)")
    p.add_argument("--max-seconds", type=float, default=120, help="the test stops sending after this")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 8], help="server settings to compare")
    p.add_argument("--engine", default="fast")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_model(args.preset, Path(tmp) / args.preset)
        for max_batch in args.max_batch:
            port = free_port()
            server = start_server(model, port, max_batch, args.engine)
            try:
                url = f"http://127.0.0.1:{port}"
                model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
                row = {"max batch": max_batch, "clients": args.clients, "max tokens": args.max_tokens,
                       **asyncio.run(load(url, model_id, args.clients, args.requests, args.max_seconds,
                                          args.max_tokens))}
            finally:
                server.terminate()
                server.wait(30)
            rows.append(row)
            print(row, flush=True)
    meta = {"model": args.model or f"random {args.preset}", "engine": args.engine, "server threads": 1,
            "cpu": os.cpu_count(), "load_average_at_end": os.getloadavg()}
    label = Path(args.model).name if args.model else args.preset
    write_json(Path(args.out) / f"load_test_{label}.json", {"meta": meta, "results": rows})
    columns = [c for c in rows[0] if c != "error samples"]
    table = markdown_table(rows, columns)
    write_text(Path(args.out) / f"load_test_{label}.md", f"# Load test (loopback)\n\n`{' '.join(sys.argv)}`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()

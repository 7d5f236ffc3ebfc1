"""Load on `fcclass serve`: requests per second and p50/p99 latency at 1, 8 and 32 concurrent clients, with dynamic
batching on (--max-batch 32 --max-wait-ms 5, the defaults) and off (--max-batch 1), for each runtime asked for.
Each client sends one Fashion-MNIST PNG per request (multipart, as curl -F would) and sends the next as soon as
the answer comes; each client is a thread with its own keep-alive connection (httpx), opened before the clock starts, on the same
machine as the server, so the figures include the clients' own CPU use. (One asyncio thread driving all the
clients through one httpx.AsyncClient was tried first: at 32 clients its own connection pool made 1 % of the
requests wait 1-4 s while the server answered each within 55 ms.)

    .venv/bin/python benchmarks/serve_load.py RUN                                  (torch; 600 requests per row)
    .venv/bin/python benchmarks/serve_load.py RUN --int8 COMPRESSED_RUN           (and the int8 ONNX model)
    .venv/bin/python benchmarks/serve_load.py RUN --requests 100 --clients 1 8     (a smoke test)

Prints a Markdown table (benchmarks/RESULTS.md has the measured ones).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
IMAGES = sorted((REPO / "samples").glob("test_*.png"))


def start(run: str, runtime: str, batching: bool) -> tuple[subprocess.Popen, str]:
    """`fcclass serve` on a free port (this checkout's fcclass), once it says it is ready."""
    args = ["--max-batch", "32", "--max-wait-ms", "5"] if batching else ["--max-batch", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "fcclass", "serve", run, "--port", "0", "--runtime", runtime, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = None
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"listening on (http://\S+)", line)
        url = found.group(1) if found else url
        if line.startswith("Ready"):
            return proc, url or ""
    raise SystemExit(f"fcclass serve did not start: {proc.wait()}")


def load(url: str, clients: int, requests: int) -> dict[str, float]:
    """``requests`` requests from ``clients`` concurrent clients: requests/s, latency percentiles (ms) and the mean
    size of the batches the requests ran in."""
    bodies = [(f.name, f.read_bytes(), "image/png") for f in IMAGES]
    latencies: list[float] = []
    batches: list[int] = []
    left, lock, start = [requests], threading.Lock(), threading.Barrier(clients + 1)

    def one_client() -> None:
        with httpx.Client(timeout=60) as client:
            client.get(f"{url}/healthz").raise_for_status()  # the connection is opened before the clock starts
            start.wait()
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                    body = bodies[left[0] % len(bodies)]
                t = time.perf_counter()
                res = client.post(f"{url}/v1/predict", files=[("files", body)])
                latencies.append(time.perf_counter() - t)
                res.raise_for_status()
                batches.append(res.json()["batch_size"])

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"rps": len(latencies) / took, "p50": q[49] * 1000, "p99": q[98] * 1000, "batch": statistics.mean(batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a trained run (served with --runtime torch)")
    parser.add_argument("--int8", help="a run compressed with `fcclass compress --quantize int8` (served with --runtime onnx)")
    parser.add_argument("--requests", type=int, default=600, help="requests per row (after 20 to warm up)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    setups: list[tuple[str, str]] = [(args.run, "torch")] + ([(args.int8, "onnx")] if args.int8 else [])
    print("| runtime | batching | clients | requests/s | p50 ms | p99 ms | mean batch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for run, runtime in setups:
        for batching in (True, False):
            proc, url = start(run, runtime, batching)
            try:
                load(url, 4, 40)  # warm-up
                for clients in args.clients:
                    r: dict[str, Any] = load(url, clients, args.requests)
                    label = "int8 ONNX" if runtime == "onnx" else "torch fp32"
                    print(f"| {label} | {'on' if batching else 'off'} | {clients} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                          f"{r['batch']:.1f} |", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


if __name__ == "__main__":
    main()

"""A real `fcclass serve` process on a free port, as a user runs it: its predictions are `fcclass predict --json`'s,
dozens of concurrent clients are all answered (in shared batches, bad uploads among them), every bad input is a 4xx and the server stays up,
the API key from the environment, SIGTERM and Ctrl-C finish the requests in flight and exit 0; a port in use and a
missing run are clear errors. The ONNX runtimes are in the slow tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, needs_fashion
from serve_support import SAMPLES, ServeProcess, bad_files
from typer.testing import CliRunner

from fcclass.cli import app

pytestmark = needs_fashion
KEY = {"X-API-Key": "k-123"}


def _cli_predictions(run: Path, files: list[Path], *args: str) -> dict[str, dict[str, Any]]:
    """`fcclass predict FILES --json -`, by file name."""
    res = CliRunner().invoke(app, ["predict", *map(str, files), "--run", str(run), "--json", "-", *args])
    assert res.exit_code == 0, res.output
    return {Path(p["path"]).name: p | {"path": Path(p["path"]).name} for p in json.loads(res.stdout)}


def _post(client: httpx.Client, url: str, files: list[Path], **kwargs: Any) -> httpx.Response:
    return client.post(f"{url}/v1/predict", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files], **kwargs)


def _check_concurrent(url: str, images: list[Path], want: dict[str, dict[str, Any]]) -> None:
    """64 concurrent clients, with 16 bad uploads among them: every good one answered right, every bad one refused."""
    bad = list(bad_files().items()) * 4

    def send_bad(i: int) -> httpx.Response:
        name, (data, _, _) = bad[i]
        return client.post(f"{url}/v1/predict", files=[("files", (name, data, "image/png"))])

    with httpx.Client(headers=KEY, timeout=60) as client:
        with ThreadPoolExecutor(80) as pool:
            good = [pool.submit(_post, client, url, [images[i % len(images)]]) for i in range(64)]
            refused = [pool.submit(send_bad, i) for i in range(16)]
            answers = [f.result() for f in good]
            assert [f.result().status_code for f in refused] == [status for _, (_, status, _) in bad]
    assert [r.status_code for r in answers] == [200] * 64
    for i, res in enumerate(answers):
        got = res.json()["predictions"][0]
        expected = want[images[i % len(images)].name]
        # in a batch of another size than predict's, the sixth decimal may move by one (as with predict --batch-size 1)
        assert got["label"] == expected["label"] and got["probability"] == pytest.approx(expected["probability"], abs=2e-6)
    assert max(r.json()["batch_size"] for r in answers) > 1  # concurrent requests shared forward passes


def _check_bad_inputs(url: str) -> None:
    with httpx.Client(headers=KEY, timeout=30) as client:
        for name, (data, status, words) in bad_files().items():
            res = client.post(f"{url}/v1/predict", files=[("files", (name, data, "image/png"))])
            assert res.status_code == status and res.json()["error"].startswith(f"{name}: ") and words in res.json()["error"], res.text
        assert client.post(f"{url}/v1/predict").status_code == 422  # an empty body
        assert _post(client, url, SAMPLES * 6).status_code == 413  # 18 files: over --max-files 16
        res = client.post(f"{url}/v1/predict", files=[("files", ("big.png", b"\0" * (2 << 20), "image/png"))])
        assert res.status_code == 413 and "--max-upload-mb" in res.json()["error"]
        assert client.get(f"{url}/v1/info", headers={"X-API-Key": ""}).status_code == 401
        assert client.get(f"{url}/healthz").status_code == 200 and _post(client, url, SAMPLES[:1]).status_code == 200


def _slow_upload(url: str, image: Path) -> httpx.Response:
    """A multipart upload of ``image`` whose second half comes a second after the first."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"" + image.name.encode() + b"\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + image.read_bytes() + b"\r\n--b--\r\n")

    def halves() -> Any:
        yield body[: len(body) // 2]
        time.sleep(1.0)
        yield body[len(body) // 2 :]

    with httpx.Client(headers=KEY, timeout=30) as client:
        return client.post(f"{url}/v1/predict", content=halves(), headers={"content-type": "multipart/form-data; boundary=b"})


def test_a_real_server_answers_as_predict_does_under_load_and_stops_cleanly(trained_run: Path, clothes_folder: Path) -> None:
    images = SAMPLES + sorted(clothes_folder.rglob("*.png"))[::20]  # 3 gray PNGs and 9 RGB ones (converted to gray)
    want = _cli_predictions(trained_run, images)
    server = ServeProcess.start(str(trained_run), "--max-batch", "16", "--max-wait-ms", "50", "--max-files", "16",
                                "--max-upload-mb", "1", "--host", "0.0.0.0", env={"FCCLASS_API_KEY": "k-123"})
    try:
        assert not any("Warning" in line for line in server.lines)  # 0.0.0.0, but with a key
        with httpx.Client(headers=KEY, timeout=30) as client:
            assert client.get(f"{server.url}/readyz").json() == {"status": "ready"}
            res = _post(client, server.url, images, params={"top_k": 3})
        assert res.status_code == 200 and res.json()["predictions"] == [want[f.name] for f in images]
        _check_concurrent(server.url, images, want)
        _check_bad_inputs(server.url)
        # SIGTERM while a request is in flight (its upload half sent): it is answered, then the process exits 0
        answer: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: answer.append(_slow_upload(server.url, SAMPLES[0])))
        waiting.start()
        time.sleep(0.4)
        status, out = server.stop(signal.SIGTERM)
        waiting.join(10)
    finally:
        server.proc.kill()
    assert status == 0 and "Stopped" in out and "Traceback" not in out, out
    assert answer and answer[0].status_code == 200


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "fcclass", "serve", "--port", str(port), "--runs-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "COLUMNS": "300"})
    assert res.returncode == 1 and res.stdout == ""
    assert f"Port {port} on 127.0.0.1 is already in use" in res.stderr and "--port 0" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_ctrl_c_exits_0_and_a_missing_run_exits_1(trained_run: Path, tmp_path: Path) -> None:
    server = ServeProcess.start(str(trained_run), "--host", "0.0.0.0")
    assert any("Warning: listening on 0.0.0.0" in line and "without an API key" in line for line in server.lines)
    status, out = server.stop(signal.SIGINT)
    assert status == 0 and "Stopped" in out and "Traceback" not in out
    res = subprocess.run([sys.executable, "-m", "fcclass", "serve", "--port", "0", "--runs-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "COLUMNS": "300"})
    assert res.returncode == 1 and "Error:" in res.stderr and "Traceback" not in res.stderr + res.stdout, res.stderr

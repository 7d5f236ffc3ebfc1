"""`fcclass serve`'s API through Starlette's TestClient, on a real trained run: predictions are `fcclass predict`'s,
every bad request is a 4xx naming the file and the cause (and the server goes on), readiness, the API key, the
OpenAPI schema and the page; the batching thread on its own."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import needs_fashion
from serve_support import SAMPLES, bad_files
from starlette.testclient import TestClient

from fcclass.inference.predict import predict
from fcclass.serve.app import create_app
from fcclass.serve.batching import Batcher
from fcclass.serve.model import Limits, Service, load_served

pytestmark = needs_fashion


def _client(run: Path, limits: Limits = Limits(), api_key: str | None = None) -> TestClient:
    service = Service(lambda: load_served(run, device="cpu"), limits)
    service.start()
    assert service.loaded.wait(60) and service.error is None, service.error
    return TestClient(create_app(service, api_key))


@pytest.fixture(scope="module")
def client(trained_run: Path) -> TestClient:
    return _client(trained_run, Limits(max_files=8, max_upload_mb=1))


def _files(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def test_predictions_are_fcclass_predicts_for_the_same_files(client: TestClient, trained_run: Path) -> None:
    want = [p.to_dict() | {"path": Path(p.path).name} for p in predict(SAMPLES, trained_run, top_k=4, device="cpu")]
    res = client.post("/v1/predict", files=_files(*SAMPLES), params={"top_k": 4})
    assert res.status_code == 200, res.text
    assert res.json()["predictions"] == want
    assert len(want[0]["top_k"]) == 4
    # JSON with base64 (a data: URL too), top_k in the body, names given or not
    images = [{"name": SAMPLES[0].name, "data": base64.b64encode(SAMPLES[0].read_bytes()).decode()},
              "data:image/png;base64," + base64.b64encode(SAMPLES[1].read_bytes()).decode()]
    res = client.post("/v1/predict", json={"images": images, "top_k": 4})
    assert res.status_code == 200, res.text
    got = res.json()["predictions"]
    assert got[0] == want[0] and got[1] == want[1] | {"path": "images[1]"}
    # the default top_k is predict's: 3
    assert [len(p["top_k"]) for p in client.post("/v1/predict", files=_files(SAMPLES[2])).json()["predictions"]] == [3]


def test_every_bad_upload_is_a_4xx_naming_the_file_and_the_server_goes_on(client: TestClient) -> None:
    for name, (data, status, words) in bad_files().items():
        res = client.post("/v1/predict", files=[("files", (name, data, "image/png"))])
        assert res.status_code == status, (name, res.text)
        body = res.json()
        assert body["error"].startswith(f"{name}: ") and words in body["error"], body
        assert body["files"] == [{"file": name, "error": body["error"].removeprefix(f"{name}: ")}]
    # one bad file among good ones: the request is refused, naming only the bad one
    res = client.post("/v1/predict", files=_files(SAMPLES[0]) + [("files", ("notes.png", b"text", "image/png"))])
    assert res.status_code == 415 and [f["file"] for f in res.json()["files"]] == ["notes.png"]
    assert client.post("/v1/predict", files=_files(SAMPLES[0])).status_code == 200


@pytest.mark.parametrize(("request_kwargs", "status", "words"), [
    ({}, 422, "body is empty"),
    ({"content": b"", "headers": {"content-type": "application/json"}}, 422, "body is empty"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "'text/plain' is not accepted"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
    ({"json": {"pictures": []}}, 422, '"images"'),
    ({"json": {"images": []}}, 422, "holds no images"),
    ({"json": {"images": ["@@not base64@@"]}}, 422, "images[0]: not valid base64"),
    ({"json": {"images": [{"name": "a.png", "data": 3}]}}, 422, "a.png: not a base64 string"),
    ({"files": [("files", (None, b"just text"))]}, 422, "holds text, not a file"),
    ({"files": _files(SAMPLES[0]), "params": {"top_k": "0"}}, 422, "top_k must be"),
    ({"files": _files(SAMPLES[0]), "data": {"top_k": "two"}}, 422, "top_k must be"),
    ({"files": _files(*[SAMPLES[0]] * 9)}, 413, "at most 8 (--max-files)"),
    ({"files": _files(*[SAMPLES[0]] * 30)}, 413, "at most 8 (--max-files)"),
    ({"files": [("files", ("big.png", b"\0" * (1 << 20), "image/png"))]}, 413, "limit of 1 MB (--max-upload-mb)"),
])
def test_bad_requests_are_4xx_with_the_cause(client: TestClient, request_kwargs: dict[str, Any], status: int, words: str) -> None:
    res = client.post("/v1/predict", **request_kwargs)
    assert res.status_code == status, res.text
    assert words in res.json()["error"]


def test_a_body_over_the_limit_without_a_length_is_refused_while_it_arrives(client: TestClient) -> None:
    sent = []

    def chunks() -> Any:  # a chunked upload: no Content-Length to refuse it by
        for _ in range(64):
            sent.append(1)
            yield b"\0" * 65536

    res = client.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert res.status_code == 413 and "--max-upload-mb" in res.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_info_names_the_model_file_its_hash_and_the_preprocessing(client: TestClient, trained_run: Path) -> None:
    info = client.get("/v1/info").json()
    assert info["model_sha256"] == hashlib.sha256((trained_run / "best.pt").read_bytes()).hexdigest()
    assert Path(info["model_file"]) == (trained_run / "best.pt").absolute() and Path(info["run"]) == trained_run.absolute()
    assert info["labels"][:2] == ["T-shirt/top", "Trouser"] and info["input_shape"] == [1, 28, 28]
    assert (info["runtime"], info["precision"], info["max_files"]) == ("torch", "fp32", 8)
    assert any("resize to 28x28" in step for step in info["preprocessing"]) and len(info["normalization"]["mean"]) == 1


def test_readyz_is_503_until_the_model_is_loaded(trained_run: Path) -> None:
    go = threading.Event()

    def slow_load() -> Any:
        go.wait(30)
        return load_served(trained_run, device="cpu")

    service = Service(slow_load)
    service.start()
    client = TestClient(create_app(service))
    assert client.get("/healthz").status_code == 200
    assert (client.get("/readyz").status_code, client.get("/readyz").json()) == (503, {"status": "loading"})
    res = client.post("/v1/predict", files=_files(SAMPLES[0]))
    assert res.status_code == 503 and "still loading" in res.json()["error"]
    go.set()
    assert service.loaded.wait(60)
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.post("/v1/predict", files=_files(SAMPLES[0])).status_code == 200


def test_with_an_api_key_every_api_call_needs_the_header(trained_run: Path) -> None:
    client = _client(trained_run, api_key="s3cret")
    for path, method in (("/v1/info", "GET"), ("/v1/predict", "POST")):
        for headers, words in (({}, "no X-API-Key header"), ({"X-API-Key": "wrong"}, "a wrong API key")):
            res = client.request(method, path, headers=headers, files=_files(SAMPLES[0]) if method == "POST" else None)
            assert res.status_code == 401 and words in res.json()["error"], (path, res.text)
    assert client.post("/v1/predict", files=_files(SAMPLES[0]), headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/v1/info", headers={"X-API-Key": "s3cret"}).status_code == 200
    for path in ("/healthz", "/readyz"):  # only the probes are open
        assert client.get(path).status_code == 200
    for path in ("/", "/docs", "/openapi.json"):  # the page and the docs too need the key: a browser gives it in the URL
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get(f"{path}?api_key=s3cret").status_code == 200
        assert client.get(f"{path}?api_key=nope").status_code == 401


def test_a_request_waiting_past_the_timeout_is_answered_503(trained_run: Path) -> None:
    # another request on its way (its upload still arriving) makes the batch wait up to a second for it; this
    # request may wait a twentieth of that
    client = _client(trained_run, Limits(max_batch=64, max_wait_ms=1000, timeout_s=0.05))
    started = time.monotonic()
    with client.app.state.service.batcher.arriving():
        res = client.post("/v1/predict", files=_files(SAMPLES[0]))
    assert res.status_code == 503 and "Timed out after 0.05 s" in res.json()["error"]
    assert time.monotonic() - started < 0.9


def test_the_openapi_schema_docs_page_and_page_are_served_offline(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1") and {"/v1/predict", "/v1/info", "/healthz", "/readyz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} == set(body)
    for path in ("/", "/docs"):
        res = client.get(path)
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
        assert "http://" not in res.text and "https://" not in res.text  # nothing fetched from elsewhere
    assert '<input type="file" id="files"' in client.get("/").text and "multiple" in client.get("/").text
    res = client.get("/nowhere")
    assert res.status_code == 404 and res.json() == {"error": "Not Found"}
    assert client.get("/v1/predict").status_code == 405


def test_the_batcher_runs_requests_that_arrive_together_as_one_batch() -> None:
    seen: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return x.float().flatten(1)

    batcher = Batcher(forward, max_batch=8, max_wait=0.5)
    on_their_way = [batcher.arriving() for _ in range(4)]  # four requests received at once, still being decoded
    for request in on_their_way:
        request.__enter__()
    futures = []
    for i, (n, request) in enumerate(zip([1, 2, 3, 4], on_their_way)):
        futures.append(batcher.submit(torch.full((n, 1), i)))
        request.__exit__(None, None, None)
    results = [f.result(5) for f in futures]
    assert seen == [6, 4]  # 1+2+3 fill 6; the 4 would make 10 > 8, so it runs next
    assert [(r[0].flatten().tolist(), r[1]) for r in results] == [([0], 6), ([1, 1], 6), ([2] * 3, 6), ([3] * 4, 4)]
    off = Batcher(forward, max_batch=1, max_wait=0.5)
    seen.clear()
    futures = [off.submit(torch.full((1, 1), i)) for i in range(3)]
    assert [f.result(5)[1] for f in futures] == [1, 1, 1] and seen == [1, 1, 1]
    started = time.monotonic()  # a lone request (none other on its way) does not wait for company
    assert batcher.submit(torch.zeros(1, 1)).result(5)[1] == 1 and time.monotonic() - started < 0.25
    with batcher.arriving():
        cancelled = batcher.submit(torch.zeros(1, 1))
        cancelled.cancel()  # a request that timed out before its batch started is left out
        assert batcher.submit(torch.zeros(2, 1)).result(5)[1] == 2
    batcher.close(5)
    off.close(5)


def _copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / run.name))


def test_runtime_onnx_needs_an_exported_or_compressed_model(trained_run: Path, tmp_path: Path) -> None:
    from fcclass.errors import FcclassError

    run = _copy_run(trained_run, tmp_path)
    (run / "model.onnx").unlink(missing_ok=True)
    with pytest.raises(FcclassError, match=r"has no ONNX model .*`fcclass export .*`fcclass compress .* --quantize int8`"):
        load_served(run, "onnx", device="cpu")
    with pytest.raises(FcclassError, match="--runtime must be torch or onnx"):
        load_served(run, "tensorrt", device="cpu")


@pytest.mark.slow
def test_onnx_runtimes_serve_the_exported_and_the_int8_model(trained_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fcclass.cli import app

    run = _copy_run(trained_run, tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["export", str(run)]).exit_code == 0
    int8 = tmp_path / "int8"
    res = runner.invoke(app, ["compress", str(run), "--quantize", "int8", "--calibration", "300", "--rounds", "1", "--out", str(int8)])
    assert res.exit_code == 0, res.output
    torch_preds = [p.to_dict() for p in predict(SAMPLES, run, top_k=3, device="cpu")]
    for served_run, runtime, precision, model_file in ((run, "onnx", "fp32", "model.onnx"), (int8, None, "int8", "model.int8.onnx"),
                                                       (int8, "onnx", "int8", "model.int8.onnx"), (int8, "torch", "fp32", "best.pt")):
        service = Service(lambda r=served_run, rt=runtime: load_served(r, rt, device="cpu"))
        service.start()
        assert service.loaded.wait(60) and service.error is None, service.error
        client = TestClient(create_app(service))
        info = client.get("/v1/info").json()
        assert (info["runtime"], info["precision"], Path(info["model_file"]).name) == (runtime or "onnx", precision, model_file)
        got = client.post("/v1/predict", files=_files(*SAMPLES)).json()["predictions"]
        want = [p.to_dict() | {"path": Path(p.path).name} for p in predict(SAMPLES, served_run, top_k=3, device="cpu")]
        if runtime != "torch":  # what `fcclass predict` gives for the run: the int8 model of a compressed run
            assert got == want if runtime is None else [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["label"] for g in got] == [p["label"] for p in torch_preds] or precision == "int8"
        for g, t in zip(got, torch_preds):
            assert g["probability"] == pytest.approx(t["probability"], abs=1e-4 if precision == "fp32" else 0.1)  # int8: close, not equal
        service.close()


def test_the_page_links_the_runs_report_once_it_is_written(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    from fcclass.report import write_report

    run = Path(shutil.copytree(trained_run, tmp_path / trained_run.name))
    client = _client(run)
    assert client.get("/v1/info").json()["report"] is None
    res = client.get("/report")
    assert res.status_code == 404 and "fcclass report" in res.json()["error"]
    write_report(run, device="cpu")  # while the server runs: the next request finds it
    assert client.get("/v1/info").json()["report"] == "/report"
    res = client.get("/report")
    assert res.status_code == 200 and "<h2>Misclassified images</h2>" in res.text
    assert 'link.id = "report-link"' in client.get("/").text  # the page adds the link when /v1/info names the report

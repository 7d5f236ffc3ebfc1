"""`fcclass serve`: a trained run as a web service, with a page to drop images on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from fcclass.cli.common import DeviceOpt, RunsDirOpt, _console, _handle_errors, _print_notes, app, err_console
from fcclass.errors import FcclassError


@app.command()
@_handle_errors
def serve(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the newest trained run in --runs-dir)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on: 127.0.0.1 for this machine only, 0.0.0.0 for every interface."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: any free port, shown when ready)."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="torch | onnx (default: what `fcclass predict` uses: a compressed run's int8 "
                                                                  "ONNX model, else the PyTorch checkpoint). onnx on an uncompressed run "
                                                                  "serves its model.onnx from `fcclass export`."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most images run as one batch; 1 turns dynamic batching off."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long a batch may wait for more requests after its first (only while more are arriving)."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body, in MB (413 above)."),
    max_files: int = typer.Option(64, "--max-files", help="Most images in one request (413 above)."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds a request may wait for the model before it is answered 503."),
    threads: int = typer.Option(1, "--threads", min=1, help="Threads the model runs on. 1 (the default) leaves the other cores to "
                                                             "reading and decoding requests; more helps large models in large batches."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FCCLASS_API_KEY", show_envvar=True,
                                          help="Require this key in the X-API-Key header (all but /healthz, /readyz and the static pages)."),
    runs_dir: Path = RunsDirOpt,
    device: str = DeviceOpt,
) -> None:
    """Serve a trained run over HTTP: POST /v1/predict, GET /v1/info, /healthz, /readyz, /docs, and a page at /."""
    try:
        import multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise FcclassError("fcclass serve needs Starlette, uvicorn and python-multipart: pip install 'fcclass[serve]'.") from None
    from fcclass.serve.app import create_app
    from fcclass.serve.model import Limits, Service, check_runtime, load_served
    from fcclass.serve.server import bind, is_loopback, run, url

    limits = Limits(max_batch, max_wait_ms, max_upload_mb, max_files, timeout)
    limits.check()
    check_runtime(runtime)  # before the port is taken and the model loaded
    console = _console()
    sock = bind(host, port)
    if not is_loopback(host) and not api_key:
        err_console.print(f"[yellow]Warning: listening on {escape(host)} (not this machine only) without an API key: anyone who can reach "
                          "it can use the model. Set one with --api-key or FCCLASS_API_KEY.[/yellow]", highlight=False)
    address = url(sock)
    service = Service(lambda: load_served(run_dir, runtime, runs_dir=runs_dir, device=device, threads=threads), limits)

    def ready(s: Any) -> None:
        if s.served is None:
            return
        served = s.served
        _print_notes(console, [served.inference.note] if served.inference.note else [])
        batching = f"batches of up to {limits.max_batch}, waiting up to {limits.max_wait_ms:g} ms" if limits.max_batch > 1 else "batching off"
        console.print(f"Serving {escape(str(served.model_file))} ({served.runtime}, {served.precision}, {len(served.inference.class_names)} labels; "
                      f"{batching}) on {address}", highlight=False)
        console.print(f"Ready (pid {os.getpid()}): the page at {address}/, the API docs at {address}/docs. Ctrl-C or SIGTERM stops it.",
                      highlight=False)

    console.print(f"Loading the model; listening on {address} (GET /readyz says 503 until it is loaded) ...", highlight=False)
    run(create_app(service, api_key), service, sock, ready, grace_s=timeout + 5)
    console.print("Stopped: requests in flight were answered.", highlight=False)

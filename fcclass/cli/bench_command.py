"""`fcclass bench`: training throughput against the PyTorch examples and Keras, and time to accuracy."""

from __future__ import annotations

from typing import Any, Optional

import typer
from rich.markup import escape

from fcclass.cli.common import DeviceOpt, JsonOpt, SetOpt, _check_json_target, _emit_json, _handle_errors, _human_console, app
from fcclass.errors import FcclassError


@app.command()
@_handle_errors
def bench(
    mode: str = typer.Option("throughput", "--mode", help="throughput | tta (time to accuracy)"),
    model: list[str] = typer.Option(["examples", "default"], "--model", help="examples (PyTorch-examples net) and/or default (configs/fashion_mnist.yaml); in "
                                                                             "tta mode also any config (fashion_mnist_best, or a YAML file)."),
    images: int = typer.Option(12_800, "--images", min=64, help="Training images timed per loop (throughput mode)."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Alternate the loops this often and keep each one's best (throughput mode)."),
    keras: bool = typer.Option(True, "--keras/--no-keras", help="Also time Keras's model.fit on the same model, when Keras is installed (throughput mode)."),
    target: list[float] = typer.Option([0.91, 0.92], "--target", help="Test accuracies to time (tta mode)."),
    set_: Optional[list[str]] = SetOpt,
    data_root: str = typer.Option("data", "--data-root", help="Where Fashion-MNIST is (or gets unpacked)."),
    device: str = DeviceOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Benchmark: fcclass vs a plain PyTorch loop vs the matmul peak (throughput), or seconds to a test accuracy (tta)."""
    _check_json_target(json_out)
    import torch

    from fcclass.bench import runner as B
    from fcclass.cli.tables import throughput_table, tta_table

    unknown = [m for m in model if m not in B.MODELS]
    if unknown and mode == "tta":  # time to accuracy trains any config: a shipped name or a YAML file
        from fcclass.config.load import resolve_config_path

        def found(name: str) -> bool:
            try:
                return resolve_config_path(name).is_file()
            except FcclassError:
                return False

        unknown = [m for m in unknown if not found(m)]
    if unknown:
        raise FcclassError(f"Unknown --model {', '.join(unknown)}: the benchmark models are {' and '.join(B.MODELS)} "
                           f"(configs/fashion_mnist.yaml's model and the PyTorch-examples net); --mode tta also takes a "
                           "shipped config's name (fashion_mnist_best) or a YAML file.")
    if mode not in ("throughput", "tta"):
        raise FcclassError(f"Unknown --mode {mode}: use throughput (images/s against PyTorch and Keras) or tta (time to accuracy).")
    from fcclass.device import select_device

    dev = select_device(device)
    console = _human_console(json_out)
    results: list[dict[str, Any]] = []
    warnings: list[dict[str, Any]] = []  # repeats that disagree (throughput mode)
    if mode == "throughput":
        peak = B.training_peak(dev)
        with_keras = keras and B.keras_runs_on(dev)
        if keras and B.keras_available() and not with_keras:
            console.print(f"[yellow]Keras skipped: its torch backend trains on {B.keras_device()}, not {dev.type}.[/yellow]")
        for name in model:
            loops = "the PyTorch-examples loop, Keras and fcclass" if with_keras else "the PyTorch-examples loop and fcclass"
            console.print(f"[bold]{name}[/bold]: timing {loops} on {images:,} images ({dev})...")
            results.append(B.throughput(name, data_root, images, peak=peak, repeats=repeats, keras=with_keras, device=device).to_dict())
        warnings = B.spread_warnings({f"the matmul peak ({peak.dtype})": peak.repeats}, "GFLOP/s") + [w for r in results for w in r["warnings"]]
        if json_out != "-":
            console.print(throughput_table(results))
        for warning in warnings:  # on stderr with --json -
            console.print(f"[yellow]Warning: {escape(warning['message'])}[/yellow]", highlight=False)
    else:
        for name in model:
            console.print(f"[bold]{name}[/bold]: training until the end of its config, testing after each epoch...")
            results.append(B.time_to_accuracy(name, target, data_root, set_, device))
        if json_out != "-":
            console.print(tta_table(results))
    import platform

    _emit_json(json_out, {"mode": mode, "machine": {"processor": platform.processor() or platform.machine(),
                                                     "cpu_threads": torch.get_num_threads(), "torch": torch.__version__},
                          "results": results, **({"warnings": warnings} if mode == "throughput" else {})})

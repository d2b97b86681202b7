"""Inference: generator slices/s by device, batch, precision, layout; per-series time split.

Part 1 (rows "throughput"): the bare generator forward under ``torch.inference_mode()``,
eval mode, input at the model's own size (demo: unet_128 ngf 16 from the shipped
weights; paper: unet_256 ngf 64, random init), batch 1/4/16, fp32 and channels_last;
on CUDA also bf16/fp16 autocast. Each cell: one warm-up batch, then batches until
--seconds have passed (at least one). torch's default thread count.

Part 2 (rows "series"): one 176 x 256x256 T1C series through the node's own code path
(``benchmarks._pipeline.run_series_timed`` = jobs.run_series, stage by stage), with
the demo model on the node's device choice (``auto``), then the outbox ``Sender`` to a
DCMTK storescp. Indented stages are parts of the stage above them.

    .venv/bin/python -m benchmarks.inference [--seconds 2] [--slices 176] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import (
    DEMO_WEIGHTS,
    Storescp,
    command_line,
    fmt,
    machine_line,
    table,
    write_mr_series,
)
from benchmarks._pipeline import Timer, make_context, run_series_timed


def models(device: torch.device) -> list[tuple[str, torch.nn.Module, int, int]]:
    from dicom_node.inference.generator import build_generator
    from dicom_node.inference.model_weights import load_weights

    demo = load_weights(DEMO_WEIGHTS, device)
    paper = build_generator("unet_256", 64).to(device).eval()
    return [(f"demo {demo.card.name} ({demo.card.input_size}px, {demo.card.input_channels} ch)",
             demo.generator.eval(), demo.card.input_size, demo.card.input_channels),
            ("paper unet_256 ngf64 (256px)", paper, 256, 1)]


def throughput(model: torch.nn.Module, size: int, channels: int, device: torch.device,
               batch: int, precision: str, channels_last: bool, budget_s: float) -> float:
    fmt_ = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt_)
    host = torch.rand(batch, channels, size, size) * 2 - 1
    if device.type == "cuda":
        host = host.pin_memory()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        x = host.to(device, non_blocking=True).contiguous(memory_format=fmt_)
        if dtype is not None:
            with torch.autocast(device.type, dtype=dtype):
                y = model(x)
        else:
            y = model(x)
        y.float().cpu()

    with torch.inference_mode():
        step()  # warm-up (cuDNN autotune, allocator)
        done = 0
        started = time.perf_counter()
        while True:
            step()
            done += batch
            if time.perf_counter() - started >= budget_s:
                break
        elapsed = time.perf_counter() - started
    model.to(memory_format=torch.contiguous_format)
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per throughput cell")
    parser.add_argument("--slices", type=int, default=176)
    parser.add_argument("--quick", action="store_true", help="0.5 s cells, batch 1 and 16")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    budget = 0.5 if args.quick else args.seconds
    batches = (1, 16) if args.quick else (1, 4, 16)
    rows: list[list[Any]] = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available()
                                       else [])
    for device in devices:
        precisions = ["fp32"] + (["bf16", "fp16"] if device.type == "cuda" else [])
        for name, model, size, channels in models(device):
            for batch in batches:
                for precision in precisions:
                    for channels_last in (False, True):
                        rate = throughput(model, size, channels, device, batch,
                                          precision, channels_last, budget)
                        rows.append(["throughput", name, device.type, batch, precision,
                                     "channels_last" if channels_last else "NCHW",
                                     fmt(rate, 1), fmt(args.slices / rate, 2), ""])
            if device.type == "cuda":
                torch.cuda.empty_cache()

    timer = Timer()
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        root = Path(tmp)
        scp = Storescp(root / "storescp").start()
        try:
            ctx = make_context(root / "node", device="auto", destinations=[
                {"name": "pacs", "ae_title": scp.ae_title, "host": "127.0.0.1",
                 "port": scp.port}])
            from dicom_node.outbox.sender import Sender

            # warm the model and the writers up, as the node does when it starts
            from dicom_node.writers.warm_up import warm_up_writers

            ctx.predictor.warm_up()
            warm_up_writers(ctx.provenance)
            source = write_mr_series(root / "src", args.slices, 256, 256, seed=11)
            queued = run_series_timed(ctx, source, timer, fine=True)
            sender = Sender(ctx.config, ctx.sessions, ctx.audit)
            with timer.stage("send: Sender.send_due -> storescp"):
                sent = sender.send_due()
            assert sent == queued, (sent, queued)
            device_name = str(ctx.predictor.device)
            ctx.engine.dispose()
        finally:
            scp.stop()
    total = sum(v for k, v in timer.seconds.items() if not k.startswith("  "))
    for stage, seconds in timer.seconds.items():
        rows.append(["series", stage, device_name, 16, "as node", "as node", "",
                     fmt(seconds, 3), fmt(100 * seconds / total, 1)])
    rows.append(["series", "TOTAL (top-level stages)", device_name, "", "", "", "",
                 fmt(total, 3), "100.0"])
    print(f"Generator inference and per-series split ({args.slices} x 256x256, demo model); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {machine_line()}")
    print(table(["part", "model / stage", "device", "batch", "precision", "layout",
                 "slices/s", f"s per {args.slices} slices / stage s", "% of series"], rows))
    print(f"reproduce: {command_line()}")


if __name__ == "__main__":
    main()

"""``dicom-node-train demo``: the node's main job, end to end, on one phantom patient.

1. Generate a phantom study (T1C, PET, fusion, ground truth) not used in training.
2. Start a receiving SCP (AE ``STORESCU`` on 127.0.0.1:11113, the embedded config's
   return address) that keeps every object it receives as a file.
3. Start the node (``dicom-node serve``) on the given config, as its own process.
4. Send the T1C series with DCMTK ``storescu`` (a real, foreign DICOM sender).
5. Wait for the SC series, SEG and SR to come back, print real vs synthetic TBR,
   write PNG previews, stop the node, and print where everything is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.config import load_config
from dicom_node.fusion import window_t1c
from dicom_node.tbr import measure_tbr
from dicom_node.writers.sr import read_tbr_report
from training.phantom import PhantomGeometry, generate_patient
from training.phantom_dicom import write_patient

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config.toml", help="node config (default config.toml)")
    parser.add_argument("--out", default="demo-output", help="folder for everything the demo writes")
    parser.add_argument("--patient-index", type=int, default=1000,
                        help="phantom patient index (the demo model was built from 0-399)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slice-spacing-mm", type=float, default=3.0)
    parser.add_argument("--timeout-s", type=float, default=600.0)


class Inbox:
    """A Storage SCP that keeps every received object as a file."""

    def __init__(self, folder: Path, ae_title: str, port: int) -> None:
        self.folder = folder
        self.datasets: list[Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None
        self._server = server

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            self.datasets.append(ds)
        return 0x0000

    def count(self, sop_class: str) -> int:
        with self._lock:
            return sum(1 for ds in self.datasets if ds.SOPClassUID == sop_class)

    def stop(self) -> None:
        self._server.shutdown()


def _wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the node exited early (code {proc.returncode}); see above")
        with socket.socket() as sock:
            sock.settimeout(0.3)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise SystemExit(f"the node did not listen on port {port} within {timeout_s:.0f} s")


def _previews(out: Path, t1c: np.ndarray, real: np.ndarray, synthetic: dict[int, np.ndarray],
              slices: list[int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(slices), 3, figsize=(9, 3 * len(slices)), squeeze=False)
    for row, k in enumerate(slices):
        for col, (title, image) in enumerate((("T1C", t1c[k]), ("real PET/T1C fusion", real[k]),
                                              ("synthetic fusion (node)", synthetic[k]))):
            axes[row][col].imshow(image, cmap="gray" if image.ndim == 2 else None)
            axes[row][col].set_title(f"{title}, slice {k + 1}", fontsize=9)
            axes[row][col].axis("off")
    fig.tight_layout()
    path = out / "previews.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config))
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    received_dir = out / "received"
    received_dir.mkdir(parents=True)
    storescu = shutil.which("storescu")
    if storescu is None:
        print("demo: DCMTK storescu not found: run 'make install'", file=sys.stderr)
        return 2
    peer = config.peer("STORESCU")
    if peer is None or peer.return_port is None:
        print("demo: the config must list peer STORESCU with a return_port", file=sys.stderr)
        return 2

    print(f"[1/5] generating phantom patient {args.patient_index} (seed {args.seed}) ...", flush=True)
    patient = generate_patient(args.patient_index, args.seed,
                               geometry=PhantomGeometry(slice_spacing_mm=args.slice_spacing_mm))
    paths = write_patient(patient, out / "phantom")
    n = len(paths.t1c)
    print(f"      {n} T1C slices, {len(patient.tumours)} tumour(s) -> {paths.folder}")

    print(f"[2/5] receiving SCP STORESCU on 127.0.0.1:{peer.return_port}", flush=True)
    inbox = Inbox(received_dir, "STORESCU", peer.return_port)
    node_cmd = [str(Path(sys.executable).parent / "dicom-node"), "serve", "--config",
                str(Path(args.config).resolve())]
    print(f"[3/5] starting the node: {' '.join(node_cmd)}", flush=True)
    node = subprocess.Popen(node_cmd)
    try:
        _wait_port(config.receiver.port, 120, node)
        print(f"[4/5] storescu -> {config.receiver.ae_title}@127.0.0.1:{config.receiver.port}",
              flush=True)
        sent = subprocess.run([storescu, "-aet", "STORESCU", "-aec", config.receiver.ae_title,
                               "127.0.0.1", str(config.receiver.port), *map(str, paths.t1c)],
                              env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True,
                              text=True, check=False)
        if sent.returncode != 0:
            print(f"demo: storescu failed: {sent.stderr}", file=sys.stderr)
            return 1
        t_sent = time.monotonic()
        print("[5/5] waiting for the fusion SC series, SEG and SR ...", flush=True)
        deadline = t_sent + args.timeout_s
        last = -1
        while time.monotonic() < deadline:
            got = (inbox.count(SC_CLASS), inbox.count(SEG_CLASS), inbox.count(SR_CLASS))
            if sum(got) != last:
                print(f"      received SC {got[0]}/{n}, SEG {got[1]}/1, SR {got[2]}/1 "
                      f"({time.monotonic() - t_sent:.0f} s)", flush=True)
                last = sum(got)
            if got[0] >= n and got[1] >= 1 and got[2] >= 1:
                break
            if node.poll() is not None:
                print("demo: the node stopped unexpectedly", file=sys.stderr)
                return 1
            time.sleep(0.5)
        else:
            print("demo: timed out waiting for results; see 'dicom-node audit'", file=sys.stderr)
            return 1
        elapsed = time.monotonic() - t_sent
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        inbox.stop()

    sr = next(ds for ds in inbox.datasets if ds.SOPClassUID == SR_CLASS)
    report = read_tbr_report(sr)
    same_method = measure_tbr(patient.uptake, float(np.prod(patient.geometry.spacing_mm)) / 1000,
                              config.analysis.tbr_threshold, config.analysis.min_lesion_volume_ml,
                              patient.fusion_style.display_threshold,
                              spacing_mm=patient.geometry.spacing_mm,
                              t1c_grey=window_t1c(patient.t1c))
    print(f"\nResults back in PACS {elapsed:.1f} s after the last instance was sent "
          f"(includes the completion grace period).\n")
    print("Tumour-to-background ratios")
    print(f"{'source':44} {'lesion':>6} {'TBRmax':>7} {'TBRmean':>8} {'vol mL':>7}")
    for t in patient.tumours:
        print(f"{'phantom ground truth (' + t.kind.value + ')':44} {t.label:>6} {t.tbr_max:7.2f} "
              f"{t.tbr_mean:8.2f} {'':>7}")
    for lesion in same_method.lesions:
        print(f"{'node method on the real PET uptake':44} {lesion.number:>6} {lesion.tbr_max:7.2f} "
              f"{lesion.tbr_mean:8.2f} {lesion.volume_ml:7.1f}")
    for item in report.lesions:
        print(f"{'node on synthetic uptake (SR)':44} {int(item['lesion']):>6} {item['tbr_max']:7.2f} "
              f"{item['tbr_mean']:8.2f} {item['volume_ml']:7.1f}")
    if not report.lesions:
        print(f"{'node on synthetic uptake (SR)':44} no lesion above threshold")
    print(f"background mean uptake: synthetic {report.background_mean:.3f}, "
          f"real (node method) {same_method.background_mean:.3f}")

    synthetic = {int(ds.InstanceNumber) - 1: ds.pixel_array for ds in inbox.datasets
                 if ds.SOPClassUID == SC_CLASS}
    tumour_slices = [int(k) for k in np.unique(np.nonzero(patient.tumour_labels)[0])]
    picks = sorted({*tumour_slices[len(tumour_slices) // 2:][:2], n // 2, n // 3})[:4]
    t1c = np.stack([dcmread(p).pixel_array for p in paths.t1c])
    preview = _previews(out, t1c, patient.fusion, synthetic, picks)
    print(f"\nreceived objects: {received_dir} ({len(inbox.datasets)} files)")
    print(f"previews:         {preview}")
    print(f"phantom study:    {paths.folder}")
    print("audit log:        .venv/bin/dicom-node audit --config " + str(args.config))
    return 0

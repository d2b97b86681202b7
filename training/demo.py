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
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.analysis.tbr import Lesion, TbrResult
from dicom_node.cli import stop_child_node
from dicom_node.config import NodeConfig, load_config
from dicom_node.inference.fusion import window_t1c
from dicom_node.writers.kos import listed_instances
from dicom_node.writers.seg import BACKGROUND_SEGMENT, lesion_segment_number
from dicom_node.writers.sr import SERIES_DESCRIPTION as SR_DESCRIPTION
from dicom_node.writers.sr import TbrReport, read_tbr_report
from training.lesion_truth import TruthLesion, match_lesions, measure_and_match, segment_masks
from training.phantom import PhantomGeometry, PhantomPatient, generate_patient
from training.phantom_dicom import patient_uids, write_patient

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # the KOS that lists the result set


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

    def has_all_listed(self, kos_class: str) -> bool:
        """Whether every instance the received KOS lists has been received too."""
        with self._lock:
            uids = {str(ds.SOPInstanceUID) for ds in self.datasets}
            kos = [ds for ds in self.datasets if ds.SOPClassUID == kos_class]
        return bool(kos) and listed_instances(kos[0]) <= uids

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


def _cell(lesion: TruthLesion, interval: str = "") -> str:
    if not lesion.found:
        return "missed"
    return f"found {lesion.tbr_max:.2f} / {lesion.tbr_mean:.2f}{interval}"


def lesion_table(patient: PhantomPatient, config: NodeConfig, report: TbrReport, seg: Dataset,
                 t1c_uids: list[str]) -> str:
    """Every ground-truth lesion: found or missed by the node's TBR method on the real PET
    uptake, on the synthetic uptake (what the node sent: its SEG's regions and its SR's
    numbers) and on the oracle uptake, with TBRmax / TBRmean; then the false foci."""
    spacing = patient.geometry.spacing_mm
    voxel_ml = float(np.prod(spacing)) / 1000.0
    grey = window_t1c(patient.t1c)
    analysis = config.analysis
    both = {source: measure_and_match(patient.tumour_labels, uptake, spacing, grey,
                                      analysis.tbr_threshold, analysis.min_lesion_volume_ml,
                                      patient.fusion_style.display_threshold)
            for source, uptake in (("real", patient.uptake), ("oracle", patient.oracle_uptake))}
    measured = {source: result for source, (result, _) in both.items()}
    matches = {source: matching for source, (_, matching) in both.items()}
    masks = segment_masks(seg, t1c_uids, patient.tumour_labels.shape)
    sent = [Lesion(number=int(item["lesion"]), tbr_max=item["tbr_max"],
                   tbr_mean=item["tbr_mean"], volume_ml=item["volume_ml"], max_uptake=0.0,
                   mean_uptake=0.0, mask=masks[lesion_segment_number(int(item["lesion"]))])
            for item in report.lesions]
    node_result = TbrResult(background_mean=report.background_mean,
                            background_mask=masks.get(BACKGROUND_SEGMENT,
                                                      np.zeros(patient.t1c.shape, bool)),
                            threshold=analysis.tbr_threshold, lesions=sent)
    matches["synthetic"] = match_lesions(patient.tumour_labels, node_result, spacing,
                                         np.zeros(patient.t1c.shape, np.float32),
                                         use_peaks=False)
    by_number = {int(item["lesion"]): item for item in report.lesions}
    lines = ["Ground-truth lesions: found or missed by the node's TBR method "
             f"(threshold {analysis.tbr_threshold:g} x background), TBRmax / TBRmean",
             f"{'lesion':<7}{'kind':<17}{'mL':>6}  {'real PET':<22}"
             f"{'synthetic (node SR) [interval]':<46}{'oracle':<22}"]
    for tumour in patient.tumours:
        cells = {}
        for source in ("real", "synthetic", "oracle"):
            truth = matches[source].of(tumour.label)
            interval = ""
            item = by_number.get(truth.finding_number)
            if source == "synthetic" and item is not None and "tbr_max_low" in item:
                interval = (f" [{item['tbr_max_low']:.2f}-{item['tbr_max_high']:.2f}]"
                            + (" EQUIVOCAL" if item.get("equivocal") else ""))
            cells[source] = _cell(truth, interval)
        lines.append(f"{tumour.label:<7}{tumour.kind.value:<17}{tumour.voxels * voxel_ml:6.1f}  "
                     f"{cells['real']:<22}{cells['synthetic']:<46}{cells['oracle']:<22}")
    if not patient.tumours:
        lines.append("(this patient has no tumour)")
    for source in ("real", "synthetic", "oracle"):
        foci = matches[source].false_foci
        text = ", ".join(f"{f.volume_ml:.1f} mL at TBRmax {f.tbr_max:.2f}" for f in foci)
        lines.append(f"false foci on {source}: {len(foci)}" + (f" ({text})" if foci else ""))
        fragments = matches[source].fragments
        if fragments:
            lines.append(f"  fragments on {source} (further lesions of a found tumour): "
                         + ", ".join(f"lesion {f.number} {f.volume_ml:.1f} mL at TBRmax "
                                     f"{f.tbr_max:.2f}" for f in fragments))
    lines.append(f"background mean uptake: synthetic {report.background_mean:.3f}, real "
                 f"{measured['real'].background_mean:.3f}, oracle "
                 f"{measured['oracle'].background_mean:.3f}")
    return "\n".join(lines)


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
    # A data directory of the demo's own, new each run: the node ignores a byte-identical
    # resend of a series it has processed (as it must for PACS retries), so a second demo
    # on the config's own data directory would wait for results that never come.
    data_dir = out / "node-data"
    node_cmd = [str(Path(sys.executable).parent / "dicom-node"), "serve", "--config",
                str(Path(args.config).resolve()), "--data-dir", str(data_dir)]
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
        print("[5/5] waiting for the fusion SC series, SEG, SR and the KOS ...", flush=True)
        deadline = t_sent + args.timeout_s
        last = -1
        while time.monotonic() < deadline:
            got = (inbox.count(SC_CLASS), inbox.count(SEG_CLASS), inbox.count(SR_CLASS),
                   inbox.count(KOS_CLASS))
            if sum(got) != last:
                print(f"      received SC {got[0]}/{n}, SEG {got[1]}/1, SR {got[2]}/1, "
                      f"KOS {got[3]}/1 ({time.monotonic() - t_sent:.0f} s)", flush=True)
                last = sum(got)
            # the KOS lists the whole set: once it and every instance it lists are here,
            # the set is complete (the image-anchored SR included, when there is one)
            if got[0] >= n and got[1] >= 1 and got[2] >= 1 and got[3] >= 1 and \
                    inbox.has_all_listed(KOS_CLASS):
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
        stop_child_node(node)
        inbox.stop()

    # the volumetric report (with the background), not the image-anchored one
    sr = next(ds for ds in inbox.datasets if ds.SOPClassUID == SR_CLASS
              and str(ds.SeriesDescription).startswith(SR_DESCRIPTION[:20]))
    seg = next(ds for ds in inbox.datasets if ds.SOPClassUID == SEG_CLASS)
    report = read_tbr_report(sr)
    print(f"\nResults back in PACS {elapsed:.1f} s after the last instance was sent "
          f"(includes the completion grace period).\n")
    print(lesion_table(patient, config, report, seg, list(patient_uids(patient).t1c)))

    synthetic = {int(ds.InstanceNumber) - 1: ds.pixel_array for ds in inbox.datasets
                 if ds.SOPClassUID == SC_CLASS}
    tumour_slices = [int(k) for k in np.unique(np.nonzero(patient.tumour_labels)[0])]
    picks = sorted({*tumour_slices[len(tumour_slices) // 2:][:2], n // 2, n // 3})[:4]
    t1c = np.stack([dcmread(p).pixel_array for p in paths.t1c])
    preview = _previews(out, t1c, patient.fusion, synthetic, picks)
    print(f"\nreceived objects: {received_dir} ({len(inbox.datasets)} files)")
    print(f"previews:         {preview}")
    print(f"phantom study:    {paths.folder}")
    print(f"audit log:        .venv/bin/dicom-node audit --config {args.config} "
          f"--data-dir {data_dir}")
    return 0

"""Orthanc as a real foreign peer in the tests: one way to start it from a configuration
dict, wait until its REST API answers, and stop it (``orthanc_peer`` in conftest.py
stops every one a test started). Used by the PACS round trip (tests/test_orthanc.py),
the DICOMweb destination (tests/test_stow.py) and the browser test
(tests/test_browser_ohif.py)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks._common import wait_for

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


def require_orthanc(*plugins: Path) -> str:
    """The Orthanc binary; the test is skipped, naming the package, when it or one of
    ``plugins`` is not installed."""
    binary = shutil.which("Orthanc")
    if binary is None:
        pytest.skip("Orthanc not installed (Debian package 'orthanc'; make system-packages)")
    for plugin in plugins:
        if not plugin.exists():
            pytest.skip(f"Orthanc plugin missing ({plugin}; Debian package "
                        "'orthanc-dicomweb'; make system-packages)")
    return binary


@dataclass
class OrthancProcess:
    """A started Orthanc and the configuration it runs with."""

    config: dict[str, Any]
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def http_port(self) -> int:
        return int(self.config["HttpPort"])

    @property
    def dicom_port(self) -> int:
        return int(self.config["DicomPort"])

    def auth_headers(self) -> dict[str, str]:
        """HTTP basic authentication as the first registered user, when the config
        turns authentication on."""
        if not self.config.get("AuthenticationEnabled"):
            return {}
        user, password = next(iter(self.config["RegisteredUsers"].items()))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def answers(self) -> bool:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/system",
                                         headers=self.auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def launch_orthanc(config: dict[str, Any], directory: Path) -> OrthancProcess:
    """Start Orthanc with ``config`` (written to ``directory``/orthanc.json, its output to
    orthanc.log there) and return once its REST API answers; fails with Orthanc's log
    when it exits first or does not answer in time."""
    binary = require_orthanc(*(Path(plugin) for plugin in config.get("Plugins", [])))
    path = directory / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    log_path = directory / "orthanc.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([binary, str(path)], stdout=log, stderr=subprocess.STDOUT)
    orthanc = OrthancProcess(config, proc, log_path)
    try:
        answered = wait_for(lambda: orthanc.answers() or proc.poll() is not None,
                            START_TIMEOUT_S, 0.2)
        assert answered and proc.poll() is None, log_path.read_text(errors="replace")
    except BaseException:
        orthanc.stop()
        raise
    return orthanc

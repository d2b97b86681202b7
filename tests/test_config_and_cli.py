"""Configuration validation and the CLI's start-up errors."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dicom_node.config import (
    default_config_path,
    embedded_config_path,
    load_config,
    parse_config,
)
from dicom_node.errors import ConfigError
from tests.conftest import free_port

MINIMAL = {"model": {"weights_path": "w.pt"}}


REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "dicom_node" / "config.toml"


def test_embedded_default_config_loads() -> None:
    assert embedded_config_path() == REPO / "config.toml"  # a source tree: its own config
    config = load_config(embedded_config_path())
    assert config.receiver.port == 11112
    assert config.series.stable_after_s == 30.0
    assert config.model.weights_path.is_absolute()
    assert any(d.return_to_sender for d in config.destinations)


@pytest.mark.parametrize(("raw", "message"), [
    ({"receiver": {"port": 70000}, **MINIMAL}, "receiver.port"),
    ({"receiver": {"colour": 1}, **MINIMAL}, "unknown key(s) ['colour']"),
    ({"model": {"weights_path": "w.pt", "device": "tpu"}}, "model.device must be one of"),
    ({}, "model.weights_path is required"),
    ({"selection": {"description_include": ["("]}, **MINIMAL}, "invalid regular expression"),
    ({"destinations": [{"name": "pacs", "ae_title": "PACS"}], **MINIMAL}, "host is required"),
    ({"analysis": {"tbr_threshold": 0.5}, **MINIMAL}, "tbr_threshold"),
    ({"analysis": {"threads": -1}, **MINIMAL}, "analysis.threads must be >= 0"),
    ({"series": {"stable_after_s": "soon"}, **MINIMAL}, "series.stable_after_s must be a number"),
    ({"peers": [{"ae_title": "A" * 17}], **MINIMAL}, "not a valid AE title"),
])
def test_bad_config_names_the_key(raw: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path)
    assert message in str(info.value)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_serve_without_weights_stops_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\ndata_dir = "var"\n[model]\nweights_path = "missing.pt"\n')
    result = _run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert "model weights not found" in result.stderr
    assert str(tmp_path / "missing.pt") in result.stderr


def test_serve_with_a_file_that_is_not_weights_refuses(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a torch file")
    config = tmp_path / "node.toml"
    config.write_text(f'[model]\nweights_path = "{bogus}"\n')
    result = _run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert "cannot read model weights" in result.stderr


def test_invalid_config_file_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[receiver\nport = 1")
    result = _run_cli("status", "--config", str(config))
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr
    assert "Traceback" not in result.stderr


def test_default_config_path_prefers_etc_then_the_code_s_own(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "config.toml"
    assert default_config_path(etc) == embedded_config_path()  # no /etc file yet
    etc.parent.mkdir()
    etc.write_text('[model]\nweights_path = "/opt/w.pt"\n')
    assert default_config_path(etc) == etc


def test_packaged_config_is_the_source_tree_s_with_system_paths() -> None:
    """A non-editable install has no source tree: the copy in dicom_node/ (package data)
    is its default. It must load there (state under /var/lib/dicom-node, the shipped demo
    model) and say everything else exactly as the source tree's config.toml."""
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["dicom_node"]
    assert "config.toml" in package_data
    packaged = load_config(PACKAGED)
    assert packaged.data_dir == Path("/var/lib/dicom-node")
    assert packaged.database_url == "sqlite:////var/lib/dicom-node/dicom-node.db"
    assert packaged.model.weights_path == REPO / "dicom_node" / "models" / "demo-generator.pt"
    assert packaged.model.weights_path.is_file()
    source = load_config(REPO / "config.toml")
    assert dataclasses.replace(
        packaged, data_dir=source.data_dir, database_url=source.database_url,
        model=dataclasses.replace(packaged.model, weights_path=source.model.weights_path)
    ) == source
def _node_toml(tmp_path: Path, weights: Path, port: int, extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "var"\n[receiver]\nport = {port}\n'
                    f'[model]\nweights_path = "{weights}"\n{extra}')
    return path


def test_check_config_and_serve_name_the_key_of_a_port_in_use(tmp_path: Path,
                                                              test_weights: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _node_toml(tmp_path, test_weights, port)
        check = _run_cli("check-config", "--config", str(config))
        assert check.returncode == 1
        assert (f"receiver.bind_address/receiver.port 127.0.0.1:{port}: FAILED: port {port} "
                "on 127.0.0.1 is already in use") in check.stdout
        serve = _run_cli("serve", "--config", str(config))
    assert serve.returncode == 2
    assert f"receiver.bind_address/receiver.port (127.0.0.1:{port})" in serve.stderr
    assert "already in use" in serve.stderr and "Traceback" not in serve.stderr
    free = _run_cli("check-config", "--config", str(config))
    assert f"receiver.bind_address/receiver.port 127.0.0.1:{port}: free" in free.stdout


def test_bind_address_not_on_this_host_is_refused(tmp_path: Path, test_weights: Path) -> None:
    config = _node_toml(tmp_path, test_weights, free_port())
    config.write_text(config.read_text().replace("[receiver]\n",
                                                 '[receiver]\nbind_address = "192.0.2.1"\n'))
    serve = _run_cli("serve", "--config", str(config))
    assert serve.returncode == 2 and "Traceback" not in serve.stderr
    assert "receiver.bind_address/receiver.port (192.0.2.1:" in serve.stderr
    assert "192.0.2.1 is not an address of this host" in serve.stderr


def test_peer_host_names_are_resolved_or_refused(tmp_path: Path, test_weights: Path) -> None:
    peers = ('[[peers]]\nae_title = "PACS"\naddresses = ["localhost"]\n'
             '[[peers]]\nae_title = "GHOST"\naddresses = ["10.1.2.3", "no-such-host.invalid"]\n')
    config = _node_toml(tmp_path, test_weights, free_port(), peers)
    check = _run_cli("check-config", "--config", str(config))
    assert check.returncode == 1
    assert "peers[0].addresses[0] (PACS) localhost: resolves to " in check.stdout
    assert "127.0.0.1" in check.stdout
    assert ("peers[1].addresses[1] (GHOST): FAILED: host name 'no-such-host.invalid' does "
            "not resolve") in check.stdout
    serve = _run_cli("serve", "--config", str(config))
    assert serve.returncode == 2 and "Traceback" not in serve.stderr
    assert "peers[1].addresses[1] (GHOST): host name 'no-such-host.invalid'" in serve.stderr
    assert len(serve.stderr.strip().splitlines()) == 1


def test_echo_on_the_shipped_config_never_echoes_the_node_itself(tmp_path: Path) -> None:
    shipped = load_config(default_config_path())
    result = _run_cli("echo", "--data-dir", str(tmp_path / "var"))
    assert f"{shipped.receiver.ae_title}@" not in result.stdout, result.stdout
    routes = {f"C-ECHO {p.ae_title}@{p.return_host}:{p.return_port}: " for p in shipped.peers}
    assert routes and all(route in result.stdout for route in routes), result.stdout
    lonely = tmp_path / "lonely.toml"
    lonely.write_text('[model]\nweights_path = "w.pt"\n[[destinations]]\nname = "back"\n'
                      'return_to_sender = true\n')
    nothing = _run_cli("echo", "--config", str(lonely))
    assert nothing.returncode == 0
    assert "nothing to echo" in nothing.stdout and "C-ECHO" not in nothing.stdout

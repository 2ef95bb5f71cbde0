"""The deploy files: systemd units, Dockerfile, kubernetes.yaml, and the configuration they share.

No image can be built and no cluster reached here (deploy/README.md), so what is tested is what
can be: the units with systemd-analyze, the Dockerfile's lines against tcpecho's options, the
image's command run as a plain child (not as PID 1) and stopped with SIGTERM, the HEALTHCHECK's
command against it, and the Kubernetes objects parsed and checked against each other.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tcpecho.config import BY_KEY, DEFAULT_DRAIN_TIMEOUT, read_file, resolve
from tests.helpers import ROOT, recv_exactly, require_peer
from tests.netns import loopback_namespace

DEPLOY = ROOT / "deploy"
CONFIG_FILE = DEPLOY / "tcpecho.toml"
INSTALLED_CONFIG = "/etc/tcpecho/tcpecho.toml"
ECHO_PORT = 65432
METRICS_PORT = 9100
# The `tcpecho` script of the environment running the tests: what `pip install` puts on the
# PATH, in the image as here.
TCPECHO = str(Path(sys.executable).parent / "tcpecho")
# Bound for what should happen at once: the banner, a probe's answer.
PROMPT = 10.0


def require_metrics_option() -> None:
    """The image and the Deployment serve --metrics, which the metrics work of issue 12 adds;
    until it is in this tree, what runs or checks their command is skipped."""
    if "metrics" not in BY_KEY:
        pytest.skip("--metrics is not an option in this tree yet (issue 12's metrics work)")


# systemd


def _units(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the units whose ExecStart names the installed tcpecho of this environment
    (systemd-analyze checks that the program exists; /usr/local/bin/tcpecho does not, here)."""
    socket_unit = tmp_path / "tcpecho.socket"
    service_unit = tmp_path / "tcpecho.service"
    socket_unit.write_text((DEPLOY / "tcpecho.socket").read_text())
    service = (DEPLOY / "tcpecho.service").read_text()
    assert "ExecStart=/usr/local/bin/tcpecho serve " in service
    service_unit.write_text(service.replace("/usr/local/bin/tcpecho", TCPECHO))
    return socket_unit, service_unit


def _unit_settings(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, by key, in order (a key may be given more than once)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """No error and no warning: an unknown or misspelt key is only a warning, so any output
    fails the test."""
    analyze = require_peer("systemd-analyze")
    units = _units(tmp_path)
    result = subprocess.run(
        [analyze, "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=PROMPT,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_service_is_hardened_to_an_exposure_of_at_most_2(tmp_path: Path) -> None:
    """systemd-analyze's own measure of the sandbox, from 0 (locked down) to 10 (none)."""
    analyze = require_peer("systemd-analyze")
    _, service = _units(tmp_path)
    # --threshold is in tenths: exit non-zero above an exposure of 2.0.
    command = [analyze, "security", "--offline=yes", "--threshold=20", str(service)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=PROMPT, check=False)
    assert result.returncode == 0, result.stdout[-2000:]


def test_the_service_runs_the_shared_config_and_outlasts_its_drain() -> None:
    service = _unit_settings(DEPLOY / "tcpecho.service")
    socket_unit = _unit_settings(DEPLOY / "tcpecho.socket")
    assert service["ExecStart"] == [f"/usr/local/bin/tcpecho serve --config {INSTALLED_CONFIG}"]
    assert service["Type"] == ["notify"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["KillMode"] == ["mixed"]  # the supervisor alone is told, once
    assert float(service["TimeoutStopSec"][0]) > _drain_timeout()
    assert service["CapabilityBoundingSet"] == [""]
    assert service["DynamicUser"] == ["yes"]
    assert socket_unit["ListenStream"] == [str(ECHO_PORT)]


def _drain_timeout() -> float:
    drain: float = read_file(str(CONFIG_FILE)).get("drain_timeout", DEFAULT_DRAIN_TIMEOUT)
    return drain


def test_the_shared_config_file_is_valid() -> None:
    resolved = resolve({}, {}, str(CONFIG_FILE))
    assert resolved.config.port == ECHO_PORT
    assert resolved.config.drain_timeout == 10


# The Dockerfile


@dataclass(frozen=True)
class Dockerfile:
    instructions: list[tuple[str, str]]  # (INSTRUCTION, its arguments), continuations joined

    def one(self, name: str) -> str:
        [arguments] = [args for instruction, args in self.instructions if instruction == name]
        return arguments

    def exec_form(self, name: str) -> list[str]:
        """The JSON array of an ENTRYPOINT or CMD: exec form, no shell in between."""
        value: list[str] = json.loads(self.one(name))
        return value

    @property
    def command(self) -> list[str]:
        return self.exec_form("ENTRYPOINT") + self.exec_form("CMD")

    def healthcheck(self) -> tuple[list[str], list[str]]:
        """The HEALTHCHECK's options and its command (exec form)."""
        options, _, command = self.one("HEALTHCHECK").partition(" CMD ")
        return shlex.split(options), json.loads(command)


def dockerfile() -> Dockerfile:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, arguments = line.strip().partition(" ")
            instructions.append((instruction, " ".join(arguments.split())))
    return Dockerfile(instructions)


def _option_values(command: list[str]) -> dict[str, str]:
    """``--name value`` pairs of a ``tcpecho serve`` command line, by option key."""
    assert command[:2] == ["tcpecho", "serve"]
    pairs = command[2:]
    values = {}
    while pairs:
        flag = pairs.pop(0)
        key = flag.removeprefix("--")
        if key == "config":  # the one option that is no ServerConfig field
            values[key] = pairs.pop(0)
            continue
        assert key in BY_KEY, f"{flag} is no option of tcpecho serve"
        values[key] = "" if BY_KEY[key].type.base is bool else pairs.pop(0)
    return values


def test_the_dockerfile_runs_tcpecho_as_pid_1_as_a_user_of_its_own() -> None:
    image = dockerfile()
    assert image.one("FROM") == "python:3.11-slim"
    assert image.exec_form("ENTRYPOINT") == ["tcpecho", "serve"]
    assert image.one("USER").split(":")[0] not in {"0", "root"}
    assert image.one("STOPSIGNAL") == "SIGTERM"


def test_the_dockerfile_exposes_and_probes_the_ports_its_command_serves() -> None:
    require_metrics_option()
    image = dockerfile()
    options = _option_values(image.command)
    echo_port = int(options["port"])
    metrics_port = int(options["metrics"].rpartition(":")[2])
    assert (echo_port, metrics_port) == (ECHO_PORT, METRICS_PORT)
    assert image.one("EXPOSE").split() == [str(echo_port), str(metrics_port)]
    timing, probe = image.healthcheck()
    assert probe[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{metrics_port}/healthz" in probe[2]
    # A probe that could hang would outlive the HEALTHCHECK's own timeout.
    assert "--timeout=3s" in timing
    assert "timeout=2" in probe[2]


def test_the_image_command_serves_answers_its_healthcheck_and_stops_on_sigterm() -> None:
    """The image's command, `tcpecho serve` and the CMD's options, run as a plain child (being
    PID 1 takes a container): it serves, the HEALTHCHECK's command succeeds against it, and
    SIGTERM makes it exit 0 within the drain timeout and a second. Its ports are fixed, so it
    runs in a network namespace of its own."""
    require_metrics_option()
    image = dockerfile()
    command = [TCPECHO, *image.command[1:]]
    _, probe = image.healthcheck()
    with loopback_namespace() as namespace:
        proc = subprocess.Popen(
            [*namespace.exec_in(), *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            banner = json.loads(proc.stdout.readline())
            assert banner["message"] == f"Listening on 0.0.0.0:{ECHO_PORT}"
            health = subprocess.run(
                [*namespace.exec_in(), sys.executable, *probe[1:]],
                capture_output=True,
                timeout=PROMPT,
                check=False,
            )
            assert health.returncode == 0, health.stderr
            with namespace.connect(("127.0.0.1", ECHO_PORT), PROMPT) as client:
                client.sendall(b"ping\n")
                assert recv_exactly(client, 5) == b"ping\n"
                began = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(DEFAULT_DRAIN_TIMEOUT + 1) == 0
            assert time.monotonic() - began <= DEFAULT_DRAIN_TIMEOUT + 1
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=PROMPT)


# Kubernetes


def _kubernetes() -> dict[str, dict[str, Any]]:
    """The objects of kubernetes.yaml, by kind."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it is in the test extras)")
    with open(DEPLOY / "kubernetes.yaml") as file:
        objects = {obj["kind"]: obj for obj in yaml.safe_load_all(file)}
    assert set(objects) == {"ConfigMap", "Deployment", "Service"}
    return objects


def test_the_configmap_is_the_shared_config_file() -> None:
    config_map = _kubernetes()["ConfigMap"]
    assert config_map["data"]["tcpecho.toml"] == CONFIG_FILE.read_text()


def test_the_deployment_probes_health_and_outlasts_its_drain() -> None:
    objects = _kubernetes()
    pod = objects["Deployment"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"echo": ECHO_PORT, "metrics": METRICS_PORT}
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert liveness["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # The grace period covers preStop's pause and then the whole drain.
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + _drain_timeout()
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["config"] == str(Path(INSTALLED_CONFIG).parent)
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    service = objects["Service"]["spec"]
    assert service["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["ports"] == [
        {"name": "echo", "port": ECHO_PORT, "targetPort": "echo", "protocol": "TCP"}
    ]


def test_the_deployment_runs_the_image_with_the_config_and_the_metrics_port() -> None:
    require_metrics_option()
    [container] = _kubernetes()["Deployment"]["spec"]["template"]["spec"]["containers"]
    options = _option_values(["tcpecho", "serve", *container["args"]])
    assert options == {"config": INSTALLED_CONFIG, "metrics": f"0.0.0.0:{METRICS_PORT}"}

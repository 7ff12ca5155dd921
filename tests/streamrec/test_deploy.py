"""docker-compose.yml and deploy/: structure, and that their commands are the real CLI.

There is no Docker engine here, so this checks the files rather than running them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def _cli() -> click.Group:
    from streamrec.cli.main import main

    return main


def _check_cli_args(args: list[str]) -> None:
    """The arguments parse with the real `streamrec` click group (no callback runs)."""
    group = _cli()
    cmd = group.get_command(click.Context(group), args[0])
    assert cmd is not None, f"`streamrec {args[0]}` is not a command"
    ctx = cmd.make_context(f"streamrec {args[0]}", list(args[1:]), resilient_parsing=False)
    assert ctx.params is not None


def test_services_and_kraft(compose: dict) -> None:
    services = compose["services"]
    assert {"kafka", "topic-init", "worker"} <= services.keys()
    kafka = _env(services["kafka"])
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"] and "broker" in kafka["KAFKA_PROCESS_ROLES"]
    assert "ZOOKEEPER" not in " ".join(kafka)
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert "checkpoints" in compose["volumes"]


def test_worker_is_scalable_and_runs_the_real_cli(compose: dict) -> None:
    w = compose["services"]["worker"]
    assert "ports" not in w, "fixed host ports would break --scale worker=N"
    assert "container_name" not in w
    assert w["build"]["dockerfile"] == "deploy/Dockerfile"
    assert any(v.split(":")[1] == "/checkpoints" for v in w["volumes"])
    assert w["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    _check_cli_args(w["command"])
    assert w["command"][0] == "worker"


def test_dockerfile_entrypoint_is_the_cli() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT (.+)$", text, re.M)
    cmd = re.search(r"^CMD (.+)$", text, re.M)
    assert entry and cmd
    import json

    assert json.loads(entry.group(1)) == ["streamrec"]
    _check_cli_args(json.loads(cmd.group(1)))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'streamrec = "streamrec.cli.main:main"' in pyproject


def test_environment_names_are_real_settings(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamrec.settings import load_settings

    env = {}
    for name in ("topic-init", "worker"):
        env.update(_env(compose["services"][name]))
    for k, v in env.items():
        if k.startswith("STREAMREC_"):
            monkeypatch.setenv(k, v)
    s = load_settings()
    assert s.kafka.bootstrap_servers == "kafka:9092"
    assert s.topics.partitions == int(env["STREAMREC_TOPICS__PARTITIONS"])
    assert str(s.model.path) == "/checkpoints"
    # every STREAMREC_ variable names an existing field
    for k in env:
        if k.startswith("STREAMREC_"):
            group, field = k.removeprefix("STREAMREC_").lower().split("__")
            assert field in type(getattr(s, group)).model_fields, k


def test_topic_init_creates_every_topic_with_partition_count(compose: dict) -> None:
    init = compose["services"]["topic-init"]
    script = (ROOT / "deploy" / "create-topics.sh").read_text()
    assert any("create-topics.sh" in v for v in init["volumes"])
    assert "--partitions" in script and "--if-not-exists" in script
    for var in ("CLICKS", "RECOMMENDATIONS", "DEAD_LETTER"):
        assert f"STREAMREC_TOPICS__{var}" in script
    assert "cleanup.policy=compact" in script
    assert shlex.split(" ".join(init["entrypoint"]))[-1] == "/create-topics.sh"


def test_cli_has_every_service_command() -> None:
    names = set(_cli().list_commands(click.Context(_cli())))
    assert {"broker", "worker", "produce", "tail", "replay", "demo"} <= names


def test_archiver_and_retrainer_share_the_volumes(compose: dict) -> None:
    from trainer.cli import main as trainer_main

    s = compose["services"]
    mounts = {n: {v.split(":")[1]: v.split(":")[0] for v in s[n]["volumes"]} for n in s}
    assert mounts["archiver"]["/archive"] == mounts["retrainer"]["/archive"] == "archive"
    assert mounts["retrainer"]["/checkpoints"] == mounts["worker"]["/checkpoints"]
    assert s["archiver"]["image"] == s["worker"]["image"]  # the serving image
    _check_cli_args(s["archiver"]["command"])
    assert s["archiver"]["command"][0] == "archive"
    cmd = trainer_main.get_command(click.Context(trainer_main), s["retrainer"]["command"][0])
    assert cmd is not None
    cmd.make_context("trainer retrain", list(s["retrainer"]["command"][1:]))
    assert "COPY trainer" in (ROOT / "deploy" / "Dockerfile.trainer").read_text()


#: streamrec service -> (its metrics port, the endpoint its health check asks)
_ENDPOINTS = {
    "worker": (9108, "/readyz"),
    "archiver": (9109, "/readyz"),
    "retrainer": (9110, "/healthz"),
}


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_compose_health_checks_ask_each_process_on_its_metrics_port(compose: dict) -> None:
    """Every streamrec service is checked on the endpoint of its own metrics port, which it
    listens on for the compose network (0.0.0.0: the default, 127.0.0.1, is local)."""
    from streamrec.settings import Settings

    services = compose["services"]
    for name, (port, path) in _ENDPOINTS.items():
        svc = services[name]
        check = " ".join(svc["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}{path}" in check, name
        assert str(port) in [str(p) for p in svc["expose"]], name
        env = {**_env(svc)}
        if name == "worker":
            assert env["STREAMREC_WORKER__METRICS_PORT"] == str(port)
        elif name == "archiver":
            assert _option(svc["command"], "--metrics-port") == str(port)
        else:
            assert _option(svc["command"], "--metrics-port") == str(port)
            assert _option(svc["command"], "--metrics-host") == "0.0.0.0"
        if name != "retrainer":
            assert env["STREAMREC_WORKER__METRICS_HOST"] == "0.0.0.0", name
    assert Settings().worker.metrics_host == "127.0.0.1"  # what the compose file overrides


def test_compose_runs_prometheus_and_grafana_on_the_files_in_deploy(compose: dict) -> None:
    services = compose["services"]
    prom, graf = services["prometheus"], services["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    for rules in config["rule_files"]:
        assert mounts[rules] == "./deploy/prometheus/alerts.yml"
    targets = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets |= {f"{n}:{sd['port']}" for n in sd["names"]}
        for st in job.get("static_configs", []):
            targets |= set(st["targets"])
    assert targets == {f"{n}:{port}" for n, (port, _) in _ENDPOINTS.items()}
    gmounts = {v.split(":")[1]: v.split(":")[0] for v in graf["volumes"]}
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/streamrec.yml").read_text()
    )["providers"][0]
    assert gmounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert gmounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    source = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    import json

    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/streamrec-overview.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {source["uid"]}
    for volume in ("prometheus-data", "grafana-data"):
        assert volume in compose["volumes"]


def test_docker_compose_config_where_docker_exists() -> None:
    """`docker compose config` where there is a Docker (there is none on the dev machines:
    the YAML-level tests above are the check there)."""
    import shutil
    import subprocess

    docker = shutil.which("docker")
    has_compose = docker is not None and (
        subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode
        == 0
    )
    if docker is None or not has_compose:  # here: a docker CLI without the compose plugin
        assert yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
        return
    done = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr

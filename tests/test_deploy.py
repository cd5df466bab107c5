"""deploy/ without Docker or a cluster: the files parse, name only commands, images, keys and
secrets the project has, and the configuration they mount passes `postflow config check`."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from postflow.cli import build_parser
from postflow.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
KUBE = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
CONFIGS = sorted(DEPLOY.rglob("postflow.toml"))


@cache
def _subcommands() -> frozenset[str]:
    """What `postflow --help` lists, as a user would read it."""
    out = subprocess.run(
        [sys.executable, "-m", "postflow.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    match = re.search(r"\{([a-z,-]+)\}", out)
    assert match, out
    return frozenset(match[1].split(","))


def _assert_cli(argv: list[str], where: str) -> None:
    """`argv` (after `postflow`) names a real subcommand with options it accepts."""
    assert argv and argv[0] in _subcommands(), f"{where}: {argv} is not a postflow command"
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing
        raise AssertionError(f"{where}: postflow {' '.join(argv)} is refused") from exc


def _load_yaml(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    return docs


def _seconds(value: str | int) -> float:
    """Compose durations (`11m`, `90s`) or plain seconds."""
    if isinstance(value, int):
        return value
    total = 0.0
    for amount, unit in re.findall(r"(\d+)(h|m|s)", value):
        total += int(amount) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


def _smtp_transaction(config: Config) -> timedelta:
    return max(config.smtp.final_timeout, config.smtp.data_timeout)


# --- every configuration file ---------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_each_mounted_config_passes_postflow_config_check(path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "postflow.cli", "--config", str(path), "config", "check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"{path}: ok")


def test_there_is_a_config_per_deployment_kind() -> None:
    assert {p.parent.name for p in CONFIGS} == {"compose", "kubernetes", "systemd"}


def _keys(table: dict[str, Any], where: str = "") -> list[str]:
    found = []
    for key, value in table.items():
        found.append(f"{where}{key}")
        if isinstance(value, dict):
            found += _keys(value, f"{where}{key}.")
    return found


def test_configs_name_secrets_never_hold_them() -> None:
    for path in CONFIGS:
        for key in _keys(tomllib.loads(path.read_text())):
            leaf = key.rsplit(".", 1)[-1]
            assert leaf not in ("password", "secret_key", "access_key", "secret"), f"{path}: {key}"


# --- Docker image and Compose -------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    lines = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for line in lines
        if (parts := line.strip().split(None, 1)) and not line.strip().startswith("#")
    ]


def test_dockerfile_is_slim_non_root_and_copies_what_exists() -> None:
    steps = _dockerfile()
    assert steps[0][0] == "FROM" and re.fullmatch(r"python:3\.1[1-9]-slim", steps[0][1])
    for kind, arg in steps:
        if kind == "COPY":
            *sources, _ = arg.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    user = [arg for kind, arg in steps if kind == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    installs = [arg for kind, arg in steps if kind == "RUN" and "pip install" in arg]
    for extra in re.findall(r"\.\[([a-z0-9,]+)\]", " ".join(installs)):
        assert set(extra.split(",")) <= set(extras)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = [arg for kind, arg in steps if kind == "ENTRYPOINT"][-1]
    assert yaml.safe_load(entry) == ["postflow"] and "postflow" in scripts
    _assert_cli(yaml.safe_load([arg for kind, arg in steps if kind == "CMD"][-1]), "CMD")


@cache
def _compose() -> dict[str, Any]:
    [doc] = _load_yaml(COMPOSE / "compose.yaml")
    return doc


def _postflow_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _compose()["services"].items() if "build" in s}


def test_compose_has_the_whole_installation() -> None:
    services = _compose()["services"]
    images = {s.get("image", "").split(":")[0] for s in services.values()}
    assert {"postgres", "temporalio/server", "temporalio/ui", "temporalio/admin-tools"} <= images
    assert set(_postflow_services()) == {"postflow-setup", "postflow-worker", "postflow-ingest"}
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in _compose()["volumes"], f"{name}: volume {source}"


def test_compose_postflow_services_run_real_commands_on_the_built_image() -> None:
    for name, service in _postflow_services().items():
        build = service["build"]
        assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile"
        )
        _assert_cli(service["command"], name)
        check = service.get("healthcheck", {}).get("test")
        if check:
            assert check[:2] == ["CMD", "postflow"], name
            _assert_cli(check[2:], f"{name} healthcheck")
    assert _postflow_services()["postflow-setup"]["command"] == ["setup"]
    for name in ("postflow-worker", "postflow-ingest"):
        assert "healthcheck" in _postflow_services()[name], name


def test_compose_mounts_one_config_where_postflow_looks_and_shares_the_spool() -> None:
    mounted = COMPOSE / "postflow.toml"
    config = load_config(mounted)
    for name, service in _postflow_services().items():
        target = service["environment"]["POSTFLOW_CONFIG"]
        assert f"./postflow.toml:{target}:ro" in service["volumes"], name
    assert config.spool.backend == "fs"
    for name in ("postflow-worker", "postflow-ingest"):
        targets = [v.split(":")[1] for v in _postflow_services()[name]["volumes"]]
        assert config.spool.path in targets, f"{name} does not mount the spool"
    port = config.ingest.listen.rsplit(":", 1)[1]
    assert any(p.endswith(f":{port}") for p in _postflow_services()["postflow-ingest"]["ports"])
    assert config.temporal.address.split(":")[0] in _compose()["services"]


def test_compose_gives_workers_longer_than_an_smtp_transaction() -> None:
    config = load_config(COMPOSE / "postflow.toml")
    grace = _seconds(_postflow_services()["postflow-worker"]["stop_grace_period"])
    assert grace > _smtp_transaction(config).total_seconds()
    ingest = _seconds(_postflow_services()["postflow-ingest"]["stop_grace_period"])
    assert ingest > config.ingest.drain_timeout.total_seconds()


# --- Kubernetes -------------------------------------------------------------------------


@cache
def _kustomization() -> dict[str, Any]:
    [doc] = _load_yaml(KUBE / "kustomization.yaml")
    return doc


def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for resource in _kustomization()["resources"]:
        for doc in _load_yaml(KUBE / resource):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), resource
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj["spec"]["template"]["spec"]["containers"]


def test_kustomize_resources_and_generated_config_exist() -> None:
    objects = _objects()
    assert {("Deployment", "postflow-worker"), ("Deployment", "postflow-ingest"),
            ("PodDisruptionBudget", "postflow-worker"), ("Service", "postflow-ingest"),
            ("Job", "postflow-setup")} <= set(objects)  # fmt: skip
    [generator] = _kustomization()["configMapGenerator"]
    assert generator["files"] == ["postflow.toml"]
    images = {i["name"] for i in _kustomization()["images"]}
    for obj in objects.values():
        if obj["kind"] in ("Deployment", "Job"):
            pod = obj["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["config"]["configMap"]["name"] == generator["name"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in pod["containers"]:
                assert container["image"] in images


def test_kubernetes_containers_run_real_commands_with_named_secrets() -> None:
    config = load_config(KUBE / "postflow.toml")
    needed = {config.spool.access_key_env, config.spool.secret_key_env} - {None}
    assert needed, "the cluster config names S3 keys by variable"
    for (kind, name), obj in _objects().items():
        if kind not in ("Deployment", "Job"):
            continue
        for container in _containers(obj):
            _assert_cli(container["args"], name)
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["POSTFLOW_CONFIG"]["value"] == "/etc/postflow/postflow.toml"
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/etc/postflow" in mounts
            for probe in ("readinessProbe", "livenessProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command")
                if command:
                    assert command[0] == "postflow"
                    _assert_cli(command[1:], f"{name} {probe}")
            if kind == "Deployment":
                for var in needed:
                    ref = env[var]["valueFrom"]["secretKeyRef"]
                    assert ref["name"] and ref["key"], f"{name}: {var}"
                    assert "value" not in env[var]


def test_workers_have_a_disruption_budget_and_outlast_an_smtp_transaction() -> None:
    objects = _objects()
    worker = objects[("Deployment", "postflow-worker")]
    labels = worker["spec"]["template"]["metadata"]["labels"]
    budget = objects[("PodDisruptionBudget", "postflow-worker")]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert worker["spec"]["selector"]["matchLabels"].items() <= labels.items()
    config = load_config(KUBE / "postflow.toml")
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > _smtp_transaction(config).total_seconds()
    ingest = objects[("Deployment", "postflow-ingest")]["spec"]["template"]["spec"]
    assert ingest["terminationGracePeriodSeconds"] > config.ingest.drain_timeout.total_seconds()


def test_ingest_service_reaches_the_configured_listener() -> None:
    objects = _objects()
    ingest = objects[("Deployment", "postflow-ingest")]
    service = objects[("Service", "postflow-ingest")]["spec"]
    labels = ingest["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in _containers(ingest)[0]["ports"]}
    [port] = service["ports"]
    assert port["targetPort"] in ports
    listen = load_config(KUBE / "postflow.toml").ingest.listen
    assert listen.endswith(f":{ports[port['targetPort']]}")


def test_kustomize_builds_and_wires_the_generated_config_map() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` cannot be run here")
    done = subprocess.run(
        [kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    [config_map] = [d for d in built if d["kind"] == "ConfigMap"]
    name = config_map["metadata"]["name"]
    assert name.startswith("postflow-config-")  # hashed: a changed file rolls the pods
    assert config_map["data"]["postflow.toml"] == (KUBE / "postflow.toml").read_text()
    for obj in built:
        assert obj["metadata"]["namespace"] == "postflow"
        if obj["kind"] in ("Deployment", "Job"):
            pod = obj["spec"]["template"]["spec"]
            assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {name}
            assert all(c["image"] == "registry.example.org/postflow:0.1.0"
                       for c in pod["containers"])  # fmt: skip


def test_helm_values_match_what_postflow_points_at() -> None:
    [values] = _load_yaml(KUBE / "temporal-values.yaml")
    config = load_config(KUBE / "postflow.toml")
    persistence = values["server"]["config"]["persistence"]
    for store in ("default", "visibility"):
        assert persistence[store]["driver"] == "sql"
        assert persistence[store]["sql"]["driver"] == "postgres12"
    assert values["web"]["enabled"] is True
    assert values["elasticsearch"]["enabled"] is False
    namespaces = {n["name"] for n in values["server"]["config"]["namespaces"]["namespace"]}
    assert config.temporal.namespace in namespaces
    # Release `temporal` in namespace `temporal`: the chart names the frontend Service so.
    assert config.temporal.address.startswith("temporal-frontend.temporal.svc")
    readme = (KUBE / "README.md").read_text()
    assert "temporal-values.yaml" in readme and "helm install" in readme


# --- systemd -----------------------------------------------------------------------------


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("name", ["postflow-worker@.service", "postflow-ingest.service"])
def test_systemd_units_run_real_commands_and_stop_gracefully(name: str) -> None:
    unit = _unit(SYSTEMD / name)
    service = unit["Service"]
    config_path = service["Environment"].split("=", 1)[1]
    assert config_path == "/etc/postflow/postflow.toml"
    for key in ("ExecStartPre", "ExecStart"):
        program, *argv = shlex.split(service[key])
        assert program == "/opt/postflow/bin/postflow"
        _assert_cli(argv, f"{name} {key}")
    assert service["User"] == "postflow"
    config = load_config(SYSTEMD / "postflow.toml")
    stop = int(service["TimeoutStopSec"])
    if "worker" in name:
        assert stop > _smtp_transaction(config).total_seconds()
    else:
        assert stop > config.ingest.drain_timeout.total_seconds()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_deploy_readme_says_what_was_run_and_what_was_only_validated() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "Planned here" not in text
    for heading in ("## What was run here", "## What was only validated"):
        assert heading in text
    for part in ("compose/", "kubernetes/", "systemd/", "Dockerfile"):
        assert part in text

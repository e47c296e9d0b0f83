"""deploy/k8s/ptmrec.yaml and the Dockerfile against the code they run: every argv parses with the
real CLIs, ports, probes and selectors agree, draining fits the grace period (no cluster needed);
deploy/build_images.sh parses and runs the image's entrypoint the way the server accepts."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from export.retrain import EXIT_KEPT_LIVE, parse_args as retrain_args
from serve.__main__ import auth_from_args, parse_args as serve_args
from serve.auth import check_exposure
from serve.server import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "k8s" / "ptmrec.yaml"
DOCKERFILE = ROOT / "Dockerfile"
BUILD_SCRIPT = ROOT / "deploy" / "build_images.sh"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    """{kind: document} (one of each kind in the file)."""
    out = {}
    for doc in yaml.safe_load_all(MANIFESTS.read_text()):
        assert doc["kind"] not in out, f"two {doc['kind']} documents"
        out[doc["kind"]] = doc
    return out


def argv(container: dict) -> list[str]:
    """The container's command + args, with $(VAR) references replaced as the kubelet would."""
    env = {e["name"]: "postgresql://u@db:5432/ptmrec" for e in container.get("env", [])}
    words = [str(w) for w in container["command"] + container.get("args", [])]
    for name, value in env.items():
        words = [w.replace(f"$({name})", value) for w in words]
    assert not any("$(" in w for w in words), words
    return words


def pod(doc: dict) -> dict:
    """The pod spec of a Deployment or CronJob."""
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def test_serving_argv_ports_and_probes_match_the_server(docs):
    deployment = docs["Deployment"]
    container = pod(deployment)["containers"][0]
    words = argv(container)
    assert words[:3] == ["python", "-m", "serve"]
    args = serve_args(words[3:])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    assert args.host == "0.0.0.0" and args.api_keys is not None and args.store
    check_exposure(auth_from_args(args, {}), args.host, args.metrics_host)  # starts, with keys
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        grpc = container[probe]["grpc"]
        assert grpc["port"] == args.port
        assert grpc.get("service", "") in ("", SERVICE_NAME)  # both report SERVING
    ready = container["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] < args.drain_seconds
    assert args.drain_seconds + args.grace_seconds < pod(deployment)["terminationGracePeriodSeconds"]
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts == {v["name"] for v in pod(deployment)["volumes"]}
    bundles = next(m for m in container["volumeMounts"] if m["mountPath"] == str(args.bundles))
    assert bundles["readOnly"]


def test_service_is_headless_and_selectors_match(docs):
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]["spec"]
    assert service["clusterIP"] == "None" and service["selector"].items() <= labels.items()
    container_ports = {p["name"] for p in pod(docs["Deployment"])["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["ports"]} == container_ports
    pdb = docs["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < docs["Deployment"]["spec"]["replicas"]


def test_retrain_cronjob_argv_parses_and_publishes_where_replicas_read(docs):
    cron = docs["CronJob"]
    container = pod(cron)["containers"][0]
    words = argv(container)
    assert words[:3] == ["python", "-m", "export.retrain"]
    args = retrain_args(words[3:])
    assert args.store and args.store.startswith("postgresql://")
    claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
             for v in pod(cron)["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(args.bundles))
    serve_claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
                    for v in pod(docs["Deployment"])["volumes"]}
    assert claim[mount["name"]] == serve_claims["bundles"] == docs[
        "PersistentVolumeClaim"]["metadata"]["name"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    rule = cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["onExitCodes"]["values"] == [EXIT_KEPT_LIVE]


def stages() -> dict[str, list[str]]:
    """{stage name: its instructions, continuation lines joined} of the Dockerfile."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out, name = {"": []}, ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            name = match.group(1) or f"unnamed{len(out)}"
            out[name] = []
        out[name].append(line)
    return out


def instruction(stage: list[str], keyword: str) -> list[str]:
    """The JSON arguments of a stage's last KEYWORD [...] instruction."""
    line = [x for x in stage if x.upper().startswith(keyword + " ")][-1]
    return json.loads(line[len(keyword):])


def test_build_script_is_executable_and_parses():
    assert os.access(BUILD_SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], check=True)


def test_build_script_overrides_of_the_serve_entrypoint_start_authenticated():
    parsed, script = stages(), BUILD_SCRIPT.read_text()
    assert any(x.startswith("ARG PYTHON_IMAGE=") for x in parsed[""])   # --build-arg target
    assert parsed["base"][0].startswith("FROM ${PYTHON_IMAGE} AS base")
    for target in ("serve", "train"):
        assert f"build_target {target} ptmrec-{target}" in script
    uid = re.search(r"useradd .*--uid (\d+)", "\n".join(parsed["base"])).group(1)
    assert f"chown {uid} " in script                                      # state dir writable
    words = instruction(parsed["serve"], "ENTRYPOINT")
    assert words[:3] == ["python", "-m", "serve"]
    overrides = ["--bundles", "/srv/bundles", "--state", "/srv/state", "--port", "50999",
                 "--metrics-port", "50998"]
    keys = ["--api-keys", "/run/secrets/ptmrec-keys"]
    for flag in overrides[::2] + keys[:1]:
        assert f"{flag} " in script
    volumes = instruction(parsed["serve"], "VOLUME")
    assert "/srv/bundles" not in volumes and "/srv/bundles:ro" in script  # not the VOLUME path
    args = serve_args(words[3:] + overrides + keys)
    assert (str(args.bundles), args.port, args.host) == ("/srv/bundles", 50999, "0.0.0.0")
    check_exposure(auth_from_args(args, {}), args.host, args.metrics_host)
    with pytest.raises(RuntimeError, match="without authentication"):
        bare = serve_args(words[3:] + overrides)
        check_exposure(auth_from_args(bare, {}), bare.host, bare.metrics_host)

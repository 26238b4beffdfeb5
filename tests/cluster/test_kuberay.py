"""The KubeRay manifests (cluster/kuberay/) checked against the CRD schemas of the KubeRay
release they name (tests/cluster/data/), with unknown fields refused as the API server refuses
them, and the wiring that makes them run a search: the token reaches every container that
talks to Ray through `authOptions` (the Ray containers, the autoscaler sidecar, the job
submitter), every volume claim and Service they name is created by a manifest, the image is the
one cluster/Dockerfile builds, and the GPU group scales from zero."""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
KUBERAY_VERSION = "1.7.0"
SCHEMAS = Path(__file__).parent / "data" / f"kuberay-v{KUBERAY_VERSION}-crd-schemas.json.gz"
FILES = ("raycluster", "rayjob", "mlflow")
TOKEN_SECRET = "autoprune-ray-token"
MLFLOW_CLIENT = "autoprune-mlflow-client"  # the pod label mlflow.yaml's NetworkPolicy admits

# The ObjectMeta fields a manifest may set (the CRDs leave metadata to the API server).
NAME = {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": NAME, "namespace": NAME, "labels": STRINGS, "annotations": STRINGS},
}


@functools.cache
def _parsed(name: str) -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all((KUBERAY / f"{name}.yaml").read_text()) if doc is not None)


def _docs(name: str) -> list[dict]:
    """The documents of one manifest file, a fresh copy (callers may change them)."""
    return copy.deepcopy(list(_parsed(name)))


def _kind(kind: str) -> dict:
    (doc,) = [d for name in FILES for d in _docs(name) if d["kind"] == kind]
    return doc


def _closed(schema):
    """A schema as the API server applies it to a structural schema: an object that lists its
    properties takes no others (they are pruned, or refused under strict field validation)
    unless it says x-kubernetes-preserve-unknown-fields. A field under CEL rules
    (x-kubernetes-validations), which this check cannot evaluate, is refused outright, so the
    manifests keep clear of such fields."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "x-kubernetes-validations" in schema:
        return False
    out = {
        key: {name: _closed(sub) for name, sub in value.items()} if key == "properties" else _closed(value)
        for key, value in schema.items()
    }
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def _object(api: str, kind: str, spec: dict) -> dict:
    properties = {"apiVersion": {"const": api}, "kind": {"const": kind}, "metadata": OBJECT_META, "spec": spec}
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": properties}


@functools.cache
def _validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """A validator per (apiVersion, kind): RayCluster and RayJob from the vendored CRDs; the
    built-in kinds from the Kubernetes types those CRDs embed (a pod template, a Service spec,
    a volume claim spec, a network policy rule), in a Deployment / NetworkPolicy frame."""
    crds = json.loads(gzip.decompress(SCHEMAS.read_bytes()))
    cluster = crds["RayCluster"]["properties"]["spec"]["properties"]
    head = cluster["headGroupSpec"]["properties"]
    pod = head["template"]
    claim = pod["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]["ephemeral"]
    claim_spec = claim["properties"]["volumeClaimTemplate"]["properties"]["spec"]
    rule = cluster["networkPolicy"]["properties"]["head"]["properties"]["ingressRules"]["items"]
    selector = rule["properties"]["from"]["items"]["properties"]["podSelector"]
    strategy = {"type": "object", "properties": {"type": {"enum": ["Recreate", "RollingUpdate"]}}}
    deployment = {
        "type": "object",
        "required": ["selector", "template"],
        "properties": {"replicas": {"type": "integer", "minimum": 0}, "selector": selector, "strategy": strategy},
    }
    deployment["properties"]["template"] = pod
    policy = {
        "type": "object",
        "required": ["podSelector"],
        "properties": {
            "podSelector": selector,
            "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": rule},
        },
    }
    schemas = {("ray.io/v1", kind): crds[kind] for kind in ("RayCluster", "RayJob")}
    for key in schemas:  # the CRDs' own frame, with the metadata fields above and no status
        schemas[key] = _object(*key, schemas[key]["properties"]["spec"])
    schemas[("apps/v1", "Deployment")] = _object("apps/v1", "Deployment", deployment)
    schemas[("v1", "Service")] = _object("v1", "Service", head["headService"]["properties"]["spec"])
    schemas[("v1", "PersistentVolumeClaim")] = _object("v1", "PersistentVolumeClaim", claim_spec)
    schemas[("networking.k8s.io/v1", "NetworkPolicy")] = _object("networking.k8s.io/v1", "NetworkPolicy", policy)
    return {key: jsonschema.Draft7Validator(_closed(schema)) for key, schema in schemas.items()}


def _errors(doc: dict) -> list[str]:
    validator = _validators().get((doc.get("apiVersion"), doc.get("kind")))
    if validator is None:
        return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


def _cluster_specs() -> list[tuple[str, dict]]:
    return [("raycluster", _kind("RayCluster")["spec"]), ("rayjob", _kind("RayJob")["spec"]["rayClusterSpec"])]


def _pod_specs() -> list[tuple[str, dict]]:
    """Every pod spec the manifests give: the Ray groups of both cluster specs (and a job
    submitter, if one is given) and the MLflow Deployment's."""
    pods = []
    for name, spec in _cluster_specs():
        pods.append((f"{name} head", spec["headGroupSpec"]["template"]["spec"]))
        pods += [(f"{name} {g['groupName']}", g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    if "submitterPodTemplate" in _kind("RayJob")["spec"]:
        pods.append(("rayjob submitter", _kind("RayJob")["spec"]["submitterPodTemplate"]["spec"]))
    return pods + [("mlflow", _kind("Deployment")["spec"]["template"]["spec"])]


def _containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def _search_commands() -> list[list[str]]:
    """Every `autoprune search` command of the Ray manifests: the RayJob's entrypoint and the
    commands their header comments tell people to run (continued lines joined)."""
    commands = [shlex.split(_kind("RayJob")["spec"]["entrypoint"])]
    for name in ("raycluster", "rayjob"):
        comment = "\n".join(line[1:] for line in (KUBERAY / f"{name}.yaml").read_text().splitlines() if line[:1] == "#")
        for line in comment.replace("\\\n", " ").splitlines():
            if "-- autoprune search " in line:  # `ray job submit ... -- autoprune search ...`
                commands.append(shlex.split(line[line.index("autoprune search") :]))
    return commands


DOCS = [(name, i) for name in FILES for i in range(len(_docs(name)))]


@pytest.mark.parametrize(("name", "index"), DOCS, ids=[f"{n}-{i}" for n, i in DOCS])
def test_every_manifest_matches_the_kuberay_schemas(name, index):
    assert _errors(_docs(name)[index]) == []


MUTATIONS = [  # (file, document, path, value): each sets a field the API server would refuse
    ("raycluster", 0, ("spec", "authOption"), {"mode": "token"}),
    ("raycluster", 0, ("spec", "headGroupSpec", "template", "spec", "containers", 0, "imagePullPolicyy"), "Always"),
    ("raycluster", 0, ("spec", "headGroupSpec", "template", "metadata", "labels", MLFLOW_CLIENT), True),
    ("rayjob", 0, ("spec", "rayClusterSpec", "authOptions", "secret"), TOKEN_SECRET),
    ("rayjob", 0, ("spec", "rayClusterSpec", "authOptions", "mode"), "tokens"),
    ("rayjob", 0, ("metadata", "nmae"), "autoprune"),
    # a field under CEL rules: valid to the API server, refused here as its rules go unchecked
    ("rayjob", 0, ("spec", "rayClusterSpec", "managedBy"), "ray.io/kuberay-operator"),
    ("mlflow", 0, ("spec", "storage"), "20Gi"),
    ("mlflow", 1, ("spec", "template", "spec", "containers", 0, "bogus"), True),
    ("mlflow", 2, ("spec", "clusterIp"), "None"),
    ("mlflow", 3, ("spec", "ingress", 0, "form"), []),
]


@pytest.mark.parametrize(("name", "index", "path", "value"), MUTATIONS, ids=[m[2][-1] for m in MUTATIONS])
def test_the_check_refuses_a_field_the_api_server_refuses(name, index, path, value):
    doc = _docs(name)[index]
    assert _errors(doc) == []
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    errors = _errors(doc)
    parent = "/".join(map(str, path[:-1])) + ":"  # where jsonschema reports a field refused outright
    assert errors and any(str(path[-1]) in e or e.startswith(parent) for e in errors), errors


def test_the_manifests_name_the_kuberay_release_they_are_checked_against():
    for name in ("raycluster", "rayjob"):
        assert f"KubeRay operator v{KUBERAY_VERSION}" in (KUBERAY / f"{name}.yaml").read_text()


def test_the_token_reaches_every_ray_container_through_auth_options():
    """KubeRay (v1.6+) injects RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, read from the Secret
    `authOptions.secretName` (key auth_token), into the Ray containers, their wait-gcs-ready
    init containers, the autoscaler sidecar and the job submitter, and presents it to the
    dashboard itself; it does so only under `authOptions`, for Ray 2.52 or later."""
    for name, spec in _cluster_specs():
        assert spec.get("authOptions") == {"mode": "token", "secretName": TOKEN_SECRET}, name
        assert Version(spec["rayVersion"]) >= Version("2.52.0"), name
    assert _kind("RayCluster")["spec"]["enableInTreeAutoscaling"] is True  # the sidecar that scales from zero
    job = _kind("RayJob")["spec"]
    assert job.get("submissionMode", "K8sJobMode") == "K8sJobMode"  # KubeRay's submitter Job, token included
    assert "submitterPodTemplate" not in job
    assert job["entrypoint"].startswith("autoprune search --address auto")
    for name in ("raycluster", "rayjob"):  # the Secret people are told to create is the one named
        text = (KUBERAY / f"{name}.yaml").read_text()
        made = re.findall(r'kubectl create secret generic (\S+) --from-literal=auth_token="\$\(cat (\S+)\)"', text)
        assert made == [(TOKEN_SECRET, "~/.autoprune/cluster-token")], made  # $(...) drops the final newline
        assert "--from-file" not in text


def test_nothing_disables_token_authentication():
    """No manifest turns authentication off, and none sets a RAY_AUTH_* variable: KubeRay skips
    a variable a container already has (and merges autoscalerOptions.env after its own), so one
    set here would shadow the token it injects."""

    def walk(node, path=()):
        if isinstance(node, dict):
            if "authOptions" in node:
                assert node["authOptions"].get("mode") == "token", path
            for key, value in node.items():
                if key == "env":
                    assert not [e["name"] for e in value if e["name"].startswith(("RAY_AUTH", "RAY_ENABLE_K8S"))], path
                walk(value, (*path, key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, (*path, i))
        elif isinstance(node, str):
            assert "RAY_AUTH_MODE=disabled" not in node and "--disable-security-middleware" not in node, path

    for name in FILES:
        walk(_docs(name), (name,))
    for name in ("raycluster", "rayjob"):
        assert "disabled" not in (KUBERAY / f"{name}.yaml").read_text()


def test_every_volume_claim_a_pod_mounts_is_created_by_a_manifest():
    claims = {
        (where, volume["persistentVolumeClaim"]["claimName"])
        for where, pod in _pod_specs()
        for volume in pod.get("volumes", [])
        if "persistentVolumeClaim" in volume
    }
    created = {
        doc["metadata"]["name"] for name in FILES for doc in _docs(name) if doc["kind"] == "PersistentVolumeClaim"
    }
    assert claims and {claim for _, claim in claims} <= created, (claims, created)
    for where, pod in _pod_specs():  # and every volume mounted is one the pod declares
        declared = {volume["name"] for volume in pod.get("volumes", [])}
        assert {m["name"] for c in _containers(pod) for m in c.get("volumeMounts", [])} <= declared, where


def _options(args: list[str]) -> dict[str, str | None]:
    options, key = {}, None
    for arg in args:
        if arg.startswith("--"):
            key = arg
            options[key] = None
        elif key is not None:
            options[key], key = arg, None
    return options


def test_the_tracking_uri_names_the_mlflow_service_and_only_the_cluster_reaches_it(monkeypatch):
    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY
    from mlflow.server.security_utils import is_allowed_host_header

    service, deployment, policy = _kind("Service"), _kind("Deployment"), _kind("NetworkPolicy")
    (port,) = service["spec"]["ports"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (served,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    options = _options(container["args"])
    assert container["command"] == ["mlflow", "server"] and options["--port"] == str(served["containerPort"])
    assert options["--host"] == "0.0.0.0"  # the Service's traffic arrives on the pod's address
    allowed = options["--allowed-hosts"].split(",")
    uris = [c[c.index("--tracking-uri") + 1] for c in _search_commands()]
    assert len(uris) >= 2
    for uri in uris:
        parts = urlsplit(uri)
        assert parts.scheme == "http" and parts.port == port["port"], uri
        assert parts.hostname.split(".")[0] == service["metadata"]["name"], uri
        assert is_allowed_host_header(allowed, parts.netloc), uri  # MLflow's own Host check
    fqdn = f"{service['metadata']['name']}.default.svc.cluster.local:{port['port']}"
    assert is_allowed_host_header(allowed, fqdn) and is_allowed_host_header(allowed, "127.0.0.1:5000")
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    # no address outside the cluster; admitted only from the Ray heads, where the driver runs
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not {"externalIPs", "loadBalancerIP", "externalName"} & service["spec"].keys()
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {MLFLOW_CLIENT: "true"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": served["containerPort"]}]
    for name, spec in _cluster_specs():
        assert spec["headGroupSpec"]["template"]["metadata"].get("labels", {}).get(MLFLOW_CLIENT) == "true", name
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["DO_NOT_TRACK"] == "true" and env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", env["MLFLOW_DISABLE_TELEMETRY"])
    assert MLFLOW_DISABLE_TELEMETRY.get() is True


def test_the_search_commands_are_valid_autoprune_searches():
    from autoprune.flags import build_parser, search_config

    commands = _search_commands()
    assert len(commands) >= 2
    for argv in commands:
        assert argv[:2] == ["autoprune", "search"], argv
        config = search_config(build_parser().parse_args(argv[1:]))
        assert config.address == "auto" and config.gpus_per_trial > 0, argv
        assert config.storage.startswith("s3://"), argv  # trial state outlives the pods


def test_the_image_is_the_one_the_dockerfile_builds():
    text = DOCKERFILE.read_text()
    build = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", text)
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M)
    assert build and ray_version
    image, ray_version = build.group(1), ray_version.group(1)
    assert {c["image"] for _, pod in _pod_specs() for c in _containers(pod)} == {image}
    for name in ("raycluster", "rayjob"):
        assert build.group(0) in (KUBERAY / f"{name}.yaml").read_text(), name
    # Ray's official image of the Ray the manifests name, which is also the Ray the image's
    # install is held to (.ci/constraints.txt): a different pin would replace the image's Ray
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-\$\{VARIANT\}$", text, re.M)
    assert {spec["rayVersion"] for _, spec in _cluster_specs()} == {ray_version}
    assert f"ray=={ray_version}\n" in (ROOT / ".ci" / "constraints.txt").read_text()
    # what it copies exists, and covers the project's metadata and every source folder
    copied = set()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        sources = [word for word in line.split() if not word.startswith("--")][:-1]
        assert all((ROOT / source).exists() for source in sources), line
        copied.update(sources)
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert {"pyproject.toml", "README.md", ".ci/constraints.txt"} | folders <= copied


def test_the_gpu_group_scales_from_zero_with_its_gpus_declared():
    """Ray's own reading of a RayCluster (what KubeRay's autoscaler sidecar runs) sees a GPU
    worker type that starts at zero nodes and offers a GPU, and a head with no CPUs for trials."""
    from autoprune import rayenv

    rayenv.quiet_environment()
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cluster = _kind("RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == 0 < group["maxReplicas"]
    job = _kind("RayJob")
    for cr in (cluster, {"metadata": job["metadata"], "spec": job["spec"]["rayClusterSpec"]}):
        cr["metadata"]["namespace"] = "default"  # KubeRay hands the autoscaler the live object
        config = _derive_autoscaling_config_from_ray_cr(cr)  # validates it against Ray's schema
        types = config["available_node_types"]
        assert types[config["head_node_type"]]["resources"]["CPU"] == 0
        (spec,) = cr["spec"]["workerGroupSpecs"]
        gpu = types[spec["groupName"]]
        assert gpu["resources"].get("GPU", 0) >= 1 and gpu["max_workers"] == spec["maxReplicas"]
        assert gpu["min_workers"] == spec["minReplicas"]

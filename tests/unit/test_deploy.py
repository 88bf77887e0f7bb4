"""The files under deploy/: what a typo there would break, checked without Docker, Kubernetes or AWS.

Every YAML parses; Kubernetes kinds, apiVersions, resource names and volume references are
right; the RayJob's entrypoint parses with sam-batch's own command line and finds the job file
of the ConfigMap, which validates with sam-batch's own schema; credentials come from Secrets
only; image tags and pinned versions agree with pyproject.toml, the Makefile and the installed
Ray; the cluster-launcher config passes Ray's own validation; the Dockerfiles pin their bases
and packages, run as a non-root user and keep the weights cache in a volume.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import tomllib
import yaml

from sam_batch.cli import _parser
from sam_batch.jobs.job_file import parse_job
from shared_data import REPO

DEPLOY = REPO / "deploy"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
RAY_VERSION = importlib.metadata.version("ray")
MAKEFILE_TORCH = re.search(r"^TORCH \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
WEIGHTS_CACHE = "/cache/sam-batch"
GPU_RESOURCE = "nvidia.com/gpu"
CREDENTIAL_ENV = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
# `AWS_SECRET_ACCESS_KEY=value` or `aws_access_key_id: value`; "..." and $VARIABLES are placeholders.
CREDENTIAL_ASSIGNMENT = re.compile(
    r"(aws_secret_access_key|aws_access_key_id|aws_session_token)[ \t]*[:=][ \t]*['\"]?([^\s'\"]+)", re.I
)

YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
TEXT_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
DOCKERFILES = {"gpu": DEPLOY / "Dockerfile", "cpu": DEPLOY / "Dockerfile.cpu"}


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    """(file, document) for every YAML document under deploy/."""
    return [(path, doc) for path in YAML_FILES for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s(kind: str) -> list[dict[str, Any]]:
    """The Kubernetes manifests of this kind."""
    return [doc for _, doc in _documents() if doc.get("kind") == kind]


def _one(kind: str) -> dict[str, Any]:
    """The one manifest of this kind (fails on none or several)."""
    (doc,) = _k8s(kind)
    return doc


def _cluster_specs() -> list[dict[str, Any]]:
    """The RayCluster specs: raycluster.yaml's and the one inside the RayJob."""
    return [doc["spec"] for doc in _k8s("RayCluster")] + [doc["spec"]["rayClusterSpec"] for doc in _k8s("RayJob")]


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, pod spec) of every Ray pod, role being "head" or the worker group's name."""
    for spec in _cluster_specs():
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield group["groupName"], group["template"]["spec"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """The init containers and containers of a pod spec."""
    return [*pod.get("initContainers", []), *pod["containers"]]


def _launcher_config() -> dict[str, Any]:
    """deploy/aws/cluster.yaml as written (before Ray fills in its defaults)."""
    return yaml.safe_load((DEPLOY / "aws" / "cluster.yaml").read_text())


# ---------------------------------------------------------------------------------- YAML, Kubernetes


def test_deploy_has_the_expected_files() -> None:
    names = {str(p.relative_to(DEPLOY)) for p in TEXT_FILES}
    assert {
        "Dockerfile",
        "Dockerfile.cpu",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/configmap.yaml",
        "aws/cluster.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses_into_mappings(path: Path) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert documents, f"{path} holds no document"
    assert all(isinstance(doc, dict) for doc in documents)


def test_kubernetes_kinds_and_api_versions() -> None:
    expected = {"ConfigMap": "v1", "RayCluster": "ray.io/v1", "RayJob": "ray.io/v1"}
    manifests = [doc for path, doc in _documents() if "kuberay" in path.parts]
    assert sorted(doc.get("kind") for doc in manifests) == sorted(expected)
    for doc in manifests:
        assert doc["apiVersion"] == expected[doc["kind"]], doc["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


# The fields of KubeRay's ray.io/v1 and of Kubernetes pods that these manifests may use; a
# misspelt field would otherwise be dropped (or rejected) only by the API server.
KNOWN_FIELDS = {
    "RayJob.spec": {
        "entrypoint",
        "submissionMode",
        "shutdownAfterJobFinishes",
        "ttlSecondsAfterFinished",
        "activeDeadlineSeconds",
        "backoffLimit",
        "rayClusterSpec",
        "clusterSelector",
        "runtimeEnvYAML",
        "entrypointNumCpus",
        "entrypointNumGpus",
        "entrypointResources",
        "submitterPodTemplate",
        "suspend",
    },
    "RayCluster.spec": {
        "rayVersion",
        "enableInTreeAutoscaling",
        "autoscalerOptions",
        "headGroupSpec",
        "workerGroupSpecs",
        "suspend",
    },
    "autoscalerOptions": {"upscalingMode", "idleTimeoutSeconds", "resources", "image", "env", "securityContext"},
    "headGroupSpec": {"rayStartParams", "template", "serviceType"},
    "workerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"},
    "pod": {"securityContext", "containers", "initContainers", "volumes", "tolerations", "nodeSelector"},
    "container": {"name", "image", "args", "command", "env", "ports", "resources", "volumeMounts"},
}


def test_kuberay_and_pod_fields_are_known() -> None:
    def check(where: str, mapping: dict[str, Any]) -> None:
        unknown = set(mapping) - KNOWN_FIELDS[where]
        assert not unknown, f"{where}: unknown fields {sorted(unknown)}"

    check("RayJob.spec", _one("RayJob")["spec"])
    for spec in _cluster_specs():
        check("RayCluster.spec", spec)
        check("autoscalerOptions", spec["autoscalerOptions"])
        check("headGroupSpec", spec["headGroupSpec"])
        for group in spec["workerGroupSpecs"]:
            check("workerGroupSpec", group)
    for _, pod in _pod_specs():
        check("pod", pod)
        for container in _containers(pod):
            check("container", container)


def test_ray_clusters_match_the_installed_ray_and_autoscale() -> None:
    specs = _cluster_specs()
    assert len(specs) == 2
    for spec in specs:
        assert spec["rayVersion"] == RAY_VERSION
        assert spec["enableInTreeAutoscaling"] is True
        head_params = spec["headGroupSpec"]["rayStartParams"]
        assert head_params["num-cpus"] == "0", "no segmenting actor on the head"
        for params in [head_params, *(g["rayStartParams"] for g in spec["workerGroupSpecs"])]:
            assert all(isinstance(v, str) for v in params.values()), "KubeRay wants rayStartParams as strings"
        for group in spec["workerGroupSpecs"]:
            assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_gpu_workers_ask_for_one_nvidia_gpu_each() -> None:
    groups = [g for spec in _cluster_specs() for g in spec["workerGroupSpecs"]]
    assert groups
    for group in groups:
        (worker,) = group["template"]["spec"]["containers"]
        for section in ("limits", "requests"):
            resources = worker["resources"][section]
            gpu_keys = [key for key in resources if "gpu" in key.lower()]
            assert gpu_keys == [GPU_RESOURCE], f"{group['groupName']} {section}: {gpu_keys}"
            assert int(resources[GPU_RESOURCE]) == 1
    for spec in _cluster_specs():
        (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert not any("gpu" in key.lower() for section in head["resources"].values() for key in section)


def test_pods_run_as_the_images_non_root_user() -> None:
    uid = int(_dockerfile("gpu").args["RAY_UID"])
    for role, pod in _pod_specs():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == uid, role


def test_images_are_sam_batch_at_the_project_version() -> None:
    images = [c["image"] for _, pod in _pod_specs() for c in _containers(pod)]
    assert images and all(image.endswith(f"/sam-batch:{VERSION}") for image in images), images


def test_every_volume_mount_names_a_volume_of_its_pod() -> None:
    for role, pod in _pod_specs():
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in _containers(pod):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{role}/{container['name']}: no volume {mount['name']!r}"


def test_gpu_workers_fetch_the_weights_into_the_cache_volume() -> None:
    for role, pod in _pod_specs():
        if role == "head":
            continue
        (fetch,) = pod["initContainers"]
        args = _parser().parse_args(fetch["args"])
        assert (args.command, args.weights_command, args.model_type) == ("weights", "fetch", "vit_t")
        for container in _containers(pod):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert WEIGHTS_CACHE in mounts, f"{role}/{container['name']} has no weights cache"
        assert mounts[WEIGHTS_CACHE] in {v["name"] for v in pod["volumes"]}
    assert _dockerfile("gpu").env["SAM_BATCH_CACHE"] == WEIGHTS_CACHE


def test_rayjob_entrypoint_parses_and_reads_the_configmaps_job_file() -> None:
    rayjob = _one("RayJob")["spec"]
    words = shlex.split(rayjob["entrypoint"])
    assert words[0] == "sam-batch"
    args = _parser().parse_args(words[1:])
    assert args.command == "run" and not args.overrides and not args.overwrite
    assert rayjob["shutdownAfterJobFinishes"] is True
    assert rayjob["ttlSecondsAfterFinished"] >= 0 and rayjob["backoffLimit"] >= 1

    configmap = _one("ConfigMap")
    job_path = PurePosixPath(args.job)
    for spec in _cluster_specs():
        head = spec["headGroupSpec"]["template"]["spec"]
        (container,) = head["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(job_path.parent)]
        (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
        assert job_path.name in configmap["data"]


def test_configmap_job_validates_and_attaches_to_its_cluster() -> None:
    (text,) = _one("ConfigMap")["data"].values()
    job = parse_job(yaml.safe_load(text), source="configmap.yaml")
    assert job.run.ray_address == "auto"
    assert job.run.executor == "ray"
    assert job.engine.device == "cuda"
    assert not job.input.storage_options and not job.output.storage_options, "credentials come from a Secret"


def test_credentials_come_from_secret_refs_only() -> None:
    secrets: set[str] = set()
    for role, pod in _pod_specs():
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), f"{role} reads S3 and needs credentials"
        for name, entry in env.items():
            if CREDENTIAL_ENV.search(name):
                assert "value" not in entry, f"{role}: {name} is a literal"
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["key"] == name
                secrets.add(ref["name"])
    assert len(secrets) == 1, f"one Secret for all pods, got {sorted(secrets)}"
    assert not _k8s("Secret"), "no Secret manifest with values in deploy/: create it with kubectl"


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_no_credential_literal_in_deploy(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    for token in re.findall(r"(?<![\w/+])[A-Za-z0-9/+]{40}(?![\w/+])", text):
        assert not all(re.search(c, token) for c in ("[a-z]", "[A-Z]", "[0-9]")), "shaped like an AWS secret key"
    for match in CREDENTIAL_ASSIGNMENT.finditer(text):
        assert match.group(2) == "..." or match.group(2).startswith(("$", "<")), f"{match.group(1)} is a literal"


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_image_tags_in_deploy_match_the_project_version(path: Path) -> None:
    tags = re.findall(r"[\w.-]+(?:/[\w.-]+)*/sam-batch:([\w][\w.-]*)", path.read_text())
    for tag in tags:
        assert tag == VERSION or tag.startswith(f"{VERSION}-"), f"{path.name}: sam-batch:{tag}"


# -------------------------------------------------------------------------------- cluster launcher


def test_cluster_launcher_config_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher_config()
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type"):
        assert key in config, key
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_launcher_workers_have_gpus_and_the_head_has_no_actor_cpus() -> None:
    config = _launcher_config()
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        assert node_type["resources"]["GPU"] >= 1, name
        assert re.match(r"(g|p)\d", node_type["node_config"]["InstanceType"]), name
        assert 1 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
        assert node_type["node_config"]["IamInstanceProfile"], f"{name} reads S3 and needs a role"
    images = {t["node_config"]["ImageId"] for t in node_types.values()}
    assert len(images) == 1 and re.fullmatch(r"ami-[0-9a-f]{8,17}", images.pop())


def test_cluster_launcher_setup_installs_pinned_packages_and_fetches_weights() -> None:
    config = _launcher_config()
    setup = config["setup_commands"]
    assert any(re.search(r'"torch==\d+\.\d+\.\d+"', command) for command in setup)
    assert any(f'"ray[default]=={RAY_VERSION}"' in command for command in setup)
    assert any('pip install -q "$HOME/sam-batch[s3]"' == command for command in setup)
    assert config["file_mounts"] == {"~/sam-batch": "."}
    (fetch,) = [shlex.split(c) for c in setup if c.startswith("sam-batch ")]
    args = _parser().parse_args(fetch[1:])
    assert (args.command, args.weights_command, args.model_type) == ("weights", "fetch", "vit_t")


# ------------------------------------------------------------------------------------- Dockerfiles


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile, with ARG defaults substituted."""

    instructions: list[tuple[str, str]]
    args: dict[str, str]
    env: dict[str, str]

    def all(self, name: str) -> list[str]:
        """The arguments of every instruction called `name` (FROM, RUN, ...), in order."""
        return [value for instruction, value in self.instructions if instruction == name]


def _dockerfile(kind: str) -> Dockerfile:
    """Parse deploy's Dockerfile of this kind: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILES[kind].read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    instructions = []
    for line in lines:
        instruction, _, value = line.partition(" ")
        value = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value.strip())
        instruction = instruction.upper()
        if instruction == "ARG":
            name, _, default = value.partition("=")
            args[name] = default
        if instruction == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(value))
        instructions.append((instruction, value))
    return Dockerfile(instructions, args, env)


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_base_images_are_pinned(kind: str) -> None:
    bases = _dockerfile(kind).all("FROM")
    assert bases
    for base in bases:
        image = base.split()[0]
        assert "@sha256:" in image or re.search(r":[\w.-]*\d[\w.-]*$", image), f"unpinned base {image}"
        assert not image.endswith(":latest")
    expected = {"gpu": r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", "cpu": r"python:3\.11\.\d+-slim-\w+"}
    assert re.fullmatch(expected[kind], bases[0].split()[0])


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_runs_as_a_created_non_root_user(kind: str) -> None:
    dockerfile = _dockerfile(kind)
    user = dockerfile.all("USER")[-1]
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    assert any("useradd" in run and re.search(rf"\b{user}\b", run) for run in dockerfile.all("RUN"))
    assert int(dockerfile.args["RAY_UID"]) != 0


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_keeps_the_weights_cache_in_a_volume(kind: str) -> None:
    dockerfile = _dockerfile(kind)
    assert dockerfile.env["SAM_BATCH_CACHE"] == WEIGHTS_CACHE
    volumes = [path for value in dockerfile.all("VOLUME") for path in json.loads(value)]
    assert volumes == [WEIGHTS_CACHE]
    assert any(f"chown ray:ray {WEIGHTS_CACHE}" in run for run in dockerfile.all("RUN"))


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_pins_torch_and_ray_and_installs_the_source_tree(kind: str) -> None:
    dockerfile = _dockerfile(kind)
    runs = " ".join(dockerfile.all("RUN"))
    torch = re.search(r'"torch==([^"]+)" --index-url "([^"]+)"', runs)
    assert torch and re.fullmatch(r"\d+\.\d+\.\d+", torch.group(1))
    if kind == "cpu":
        assert torch.group(1) == MAKEFILE_TORCH, "the CPU image runs the torch that the tests run"
        assert torch.group(2) == "https://download.pytorch.org/whl/cpu"
    else:
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", torch.group(2))
        assert re.search(r'"tensorrt-cu12==\d+\.\d+\.\d+\.\d+" --extra-index-url "https://pypi.nvidia.com"', runs)
    assert f'"ray[default]=={RAY_VERSION}"' in runs
    assert 'pip install "/tmp/src[s3]"' in runs
    assert json.loads(dockerfile.all("ENTRYPOINT")[-1]) == ["sam-batch"]
    assert dockerfile.args["SAM_BATCH_VERSION"] == VERSION


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_copies_what_exists_and_its_dockerignore_lets_through(kind: str) -> None:
    dockerfile = _dockerfile(kind)
    allowed = {
        line[1:] for line in Path(f"{DOCKERFILES[kind]}.dockerignore").read_text().splitlines() if line.startswith("!")
    }
    sources = [src for value in dockerfile.all("COPY") for src in value.split()[:-1]]
    assert {"pyproject.toml", "README.md", "sam_batch", "engines", "pipeline", "jobs"} == set(sources)
    for src in sources:
        assert (REPO / src).exists(), src
        assert src in allowed, f"{src} is not let through the .dockerignore"

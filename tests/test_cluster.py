"""The image and the KubeRay manifests, checked against what they name: the Dockerfile installs
with the lock from the Ray image this package pins (and `make` takes torch's CPU build); every
manifest under cluster/ validates against KubeRay's v1 CRD schemas (vendored in cluster/crds/)
with unknown fields refused, passes the checks KubeRay's operator makes that its CRDs do not
(ray-operator/controllers/ray/utils/validation.go, v1.7.0), and names images, entry points,
flags, files and a Serve application that exist. Each check is also shown to fail on a broken
manifest. Nothing here can build the image or reach a Kubernetes API (docs/operations.md: what
is tested where)."""

from __future__ import annotations

import copy
import fnmatch
import importlib
import inspect
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from click.testing import CliRunner
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema

from pipelines.rm.serving import APP_NAME
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
MANIFESTS = sorted(
    p for p in CLUSTER.rglob("*.yaml") if p.parent.name != "crds" and p.name != "runtime_env.yaml"
)
SCHEMAS = {
    kind: json.loads((CLUSTER / "crds" / f"ray.io_{plural}.v1.json").read_text())
    for kind, plural in (
        ("RayCluster", "rayclusters"),
        ("RayJob", "rayjobs"),
        ("RayService", "rayservices"),
    )
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
IMAGES = {f"synpref:{PROJECT['version']}", f"synpref:{PROJECT['version']}-gpu"}
GPU = "nvidia.com/gpu"


# ------------------------------------------------------------------------------ Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def docker_arg(name: str) -> str:
    (value,) = [a.split("=", 1)[1] for i, a in dockerfile() if i == "ARG" and a.startswith(name)]
    return value


def image_workdir() -> str:
    (workdir,) = [a for i, a in dockerfile() if i == "WORKDIR"]
    return workdir


def copied() -> list[str]:
    """The sources of the COPY instructions (flags dropped, the destination last)."""
    sources = []
    for instruction, args in dockerfile():
        if instruction == "COPY":
            sources += [a for a in args.split() if not a.startswith("--")][:-1]
    return sources


def in_build_context(path: str) -> bool:
    """``.dockerignore``'s verdict on ``path``: the last matching pattern wins, ``!`` keeps."""
    kept = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, f"**/{pattern}"):
            kept = keep
    return kept


def test_the_image_is_ray_s_for_our_versions_and_installs_with_the_lock():
    python = "".join(PROJECT["requires-python"].split(",")[0].lstrip(">=").split(".")[:2])
    assert docker_arg("RAY_IMAGE") == f"rayproject/ray:{ray.__version__}-py{python}"
    assert ("FROM", "${RAY_IMAGE}") in dockerfile()
    (install,) = [a for i, a in dockerfile() if i == "RUN" and "pip install" in a]
    assert "-c requirements.lock" in install, "every dependency at the lock's version"
    assert "download.pytorch.org/whl/cpu" in docker_arg("TORCH_INDEX"), "no CUDA torch by default"
    for module in re.findall(r"import ([\w., ]+)\"", install)[0].split(","):
        assert importlib.util.find_spec(module.strip()), module


def test_make_installs_the_cpu_build_of_torch_where_no_local_wheel_is_found(tmp_path):
    """`make`'s uv takes torch from pip's find-links where they hold a torch wheel (this
    machine's CPU build), from PyTorch's CPU index where not: PyPI's is a CUDA build."""

    def install_line(find_links: str) -> str:
        venv = tmp_path / "venv"
        plan = subprocess.run(
            [
                "make",
                "-n",
                f"VENV={venv}",
                f"UV_FIND_LINKS={find_links}",
                f"{venv}/.synpref-installed",
            ],
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if k != "UV_TORCH_BACKEND"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (line,) = [line for line in plan.splitlines() if "-c requirements.lock" in line]
        return line

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for find_links in ("", str(wheels)):
        assert "--torch-backend cpu" in install_line(find_links), find_links
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    assert "--torch-backend" not in install_line(str(wheels))


def test_the_image_copies_every_package_the_install_needs():
    sources = copied()
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert in_build_context(source), f"{source} is left out by .dockerignore"
    packages = {
        p.rstrip("*")
        for p in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]["find"]["include"]
    }
    assert packages <= set(sources), "the install builds these packages"
    assert {"pyproject.toml", "requirements.lock", PROJECT["readme"], "configs"} <= set(sources)
    assert not in_build_context("lake") and not in_build_context(".venv")


# ------------------------------------------------------------------------------ manifests


def closed(schema: Any) -> Any:
    """The schema with unknown fields refused: Kubernetes prunes them silently, so a misspelled
    field would be dropped on apply (objects that keep unknown fields are left open)."""
    if isinstance(schema, dict):
        schema = {k: closed(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [closed(v) for v in schema]
    return schema


VALIDATORS = {kind: jsonschema.Draft7Validator(closed(s)) for kind, s in SCHEMAS.items()}


def cluster_specs(manifest: dict) -> list[dict]:
    spec = manifest["spec"]
    return [
        s
        for s in (spec, spec.get("rayClusterSpec"), spec.get("rayClusterConfig"))
        if s and "headGroupSpec" in s
    ]


def containers(cluster: dict) -> list[tuple[str, dict]]:
    """(group, container) of every container of a cluster spec."""
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [
        (name, container)
        for name, group in groups
        for container in group["template"]["spec"]["containers"]
    ]


def entrypoints(manifest: dict) -> list[list[str]]:
    """The commands a manifest runs: a RayJob's entrypoint."""
    entry = manifest["spec"].get("entrypoint")
    return [shlex.split(entry)] if entry else []


def problems(manifest: dict) -> list[str]:
    """Everything wrong with a manifest: the CRD schema, then what the operator and the code
    require of it."""
    kind = manifest.get("kind")
    if kind not in VALIDATORS:
        return [f"kind {kind!r} is none of {sorted(VALIDATORS)}"]
    found = [
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in VALIDATORS[kind].iter_errors(manifest)
    ]
    if manifest.get("apiVersion") != "ray.io/v1":
        found.append(f"apiVersion {manifest.get('apiVersion')!r}, not ray.io/v1")
    meta = manifest.get("metadata", {})
    name = meta.get("name") or meta.get("generateName", "").rstrip("-")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", name or ""):
        found.append(f"metadata name {name!r} is not a DNS-1035 label KubeRay accepts")
    if found:
        return found
    spec = manifest["spec"]
    if kind == "RayJob":
        found += rayjob_problems(spec)
    if kind == "RayService":
        found += rayservice_problems(spec)
    for cluster in cluster_specs(manifest):
        found += cluster_problems(cluster)
    for command in entrypoints(manifest):
        found += entrypoint_problems(command)
    return found


def rayjob_problems(spec: dict) -> list[str]:
    found = []
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        found.append(f"submissionMode {mode!r} is none of {sorted(SUBMISSION_MODES)}")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        found.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
    selector = spec.get("clusterSelector")
    if bool(selector) == bool(spec.get("rayClusterSpec")):
        found.append("exactly one of rayClusterSpec and clusterSelector")
    if selector:
        target = selector.get("ray.io/cluster")
        if target not in {m["metadata"]["name"] for m in manifests("RayCluster")}:
            found.append(f"clusterSelector names {target!r}, no RayCluster in cluster/")
        if spec.get("shutdownAfterJobFinishes"):
            found.append("shutdownAfterJobFinishes on a cluster the job does not own")
    if mode != "InteractiveMode" and not spec.get("entrypoint"):
        found.append("no entrypoint")
    return found


def rayservice_problems(spec: dict) -> list[str]:
    """serveConfigV2 is Ray Serve's config: valid for Ray's own schema, with an application
    builder that exists and accepts the args."""
    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    except Exception as exc:
        return [f"serveConfigV2: {exc}"]
    found = []
    for app in config.applications:
        module, _, attribute = app.import_path.partition(":")
        builder = getattr(importlib.import_module(module), attribute, None)
        if builder is None:
            found.append(f"{app.import_path} does not exist")
            continue
        (parameter,) = inspect.signature(builder).parameters.values()
        try:
            args = parameter.annotation.model_validate(app.args)
        except Exception as exc:
            found.append(f"{app.name} args: {exc}")
            continue
        found += image_path_problems(args.config)
        if app.name != APP_NAME:
            found.append(f"application {app.name!r}: the API's is {APP_NAME!r}")
    return found


def cluster_problems(cluster: dict) -> list[str]:
    found = []
    if cluster.get("rayVersion") != ray.__version__:
        found.append(f"rayVersion {cluster.get('rayVersion')} but the lock has {ray.__version__}")
    if cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
        found.append("the head takes tasks: rayStartParams num-cpus must be '0'")
    for group in cluster.get("workerGroupSpecs", []):
        low, high = group["minReplicas"], group["maxReplicas"]
        if not low <= group.get("replicas", low) <= high:
            found.append(f"group {group['groupName']}: replicas outside {low}..{high}")
    for group, container in containers(cluster):
        image = container.get("image")
        if image not in IMAGES:
            found.append(f"group {group}: image {image!r} is none of {sorted(IMAGES)}")
        wants_gpu = GPU in container.get("resources", {}).get("limits", {})
        if wants_gpu != (image or "").endswith("-gpu"):
            found.append(f"group {group}: GPUs need the -gpu image and only they do")
    return found


def entrypoint_problems(command: list[str]) -> list[str]:
    """``python -m ray_jobs.X ARGS``: the module exists as a script and its parser accepts the
    arguments (``--help`` after them parses without running the job); files under the image's
    working directory are files of this checkout."""
    if command[:2] != ["python", "-m"] or not command[2].startswith("ray_jobs."):
        return [f"entrypoint {' '.join(command[:3])}: not python -m ray_jobs.JOB"]
    script = REPO / Path(*command[2].split(".")).with_suffix(".py")
    if not script.is_file() or 'if __name__ == "__main__":' not in script.read_text():
        return [f"{command[2]} cannot run as python -m"]
    module = importlib.import_module(command[2])
    result = CliRunner().invoke(module.command, [*command[3:], "--help"])
    found = [] if result.exit_code == 0 else [f"{command[2]}: {result.output.strip()}"]
    for word in command[3:]:
        found += image_path_problems(word) if word.startswith(image_workdir()) else []
    return found


def image_path_problems(path: str | None) -> list[str]:
    if path is None:
        return []
    relative = Path(path).relative_to(image_workdir()) if path.startswith("/") else Path(path)
    top = relative.parts[0]
    if top not in copied() or not (REPO / relative).exists():
        return [f"{path}: not in the image (no {relative} copied from this checkout)"]
    return []


def manifests(kind: str | None = None) -> list[dict]:
    loaded = [yaml.safe_load(p.read_text()) for p in MANIFESTS]
    return [m for m in loaded if kind is None or m["kind"] == kind]


def test_there_is_a_manifest_for_the_cluster_every_job_the_loop_and_serving():
    kinds = {
        p.relative_to(CLUSTER).as_posix(): yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS
    }
    assert kinds["raycluster.yaml"] == "RayCluster"
    assert kinds["rayservice.yaml"] == "RayService"
    steps = {
        "ingest",
        "dedup",
        "decontaminate",
        "annotate",
        "judge",
        "train",
        "score",
        "evaluate",
        "loop",
    }
    assert {f"jobs/{step}.yaml" for step in steps} <= {k for k, v in kinds.items() if v == "RayJob"}
    (cluster,) = manifests("RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert cluster["spec"]["enableInTreeAutoscaling"] and {"cpu", "gpu"} <= set(groups)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_manifest_is_valid_for_kuberay_and_matches_the_code(path: Path):
    assert problems(yaml.safe_load(path.read_text())) == []


def test_the_runtime_env_is_one_ray_accepts():
    RuntimeEnv(**yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))


def _broken(path: str, change) -> list[str]:
    manifest = copy.deepcopy(yaml.safe_load((CLUSTER / path).read_text()))
    change(manifest)
    return problems(manifest)


BREAKAGES = {
    "a misspelled field": (
        "jobs/loop.yaml",
        lambda m: m["spec"].update(shutdownAfterJobFinish=True),
        "Additional properties are not allowed ('shutdownAfterJobFinish'",
    ),
    "a wrong type": (
        "raycluster.yaml",
        lambda m: m["spec"]["workerGroupSpecs"][0].update(maxReplicas="many"),
        "'many' is not of type 'integer'",
    ),
    "a submission mode KubeRay does not know": (
        "jobs/dedup.yaml",
        lambda m: m["spec"].update(submissionMode="K8sMode"),
        "submissionMode 'K8sMode'",
    ),
    "a TTL without shutdown": (
        "jobs/loop.yaml",
        lambda m: m["spec"].update(shutdownAfterJobFinishes=False),
        "ttlSecondsAfterFinished without shutdownAfterJobFinishes",
    ),
    "a job on a cluster that is not defined": (
        "jobs/judge.yaml",
        lambda m: m["spec"].update(clusterSelector={"ray.io/cluster": "synpref-old"}),
        "clusterSelector names 'synpref-old'",
    ),
    "a job module that does not exist": (
        "jobs/score.yaml",
        lambda m: m["spec"].update(entrypoint="python -m ray_jobs.scores --json"),
        "ray_jobs.scores cannot run as python -m",
    ),
    "a flag the job does not have": (
        "jobs/train.yaml",
        lambda m: m["spec"].update(entrypoint=m["spec"]["entrypoint"] + " --epochs 2"),
        "No such option '--epochs'",
    ),
    "a config file the image does not hold": (
        "jobs/dedup.yaml",
        lambda m: m["spec"].update(
            entrypoint="python -m ray_jobs.dedup --config /home/ray/synpref/configs/prod.yaml"
        ),
        "configs/prod.yaml: not in the image",
    ),
    "an image nothing builds": (
        "raycluster.yaml",
        lambda m: m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            image="synpref:latest"
        ),
        "image 'synpref:latest'",
    ),
    "a head that takes tasks": (
        "rayservice.yaml",
        lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
        "the head takes tasks",
    ),
    "a Serve builder that does not exist": (
        "rayservice.yaml",
        lambda m: m["spec"].update(
            serveConfigV2=m["spec"]["serveConfigV2"].replace("build_app", "make_app")
        ),
        "pipelines.rm.serving:make_app does not exist",
    ),
    "Serve args the builder refuses": (
        "rayservice.yaml",
        lambda m: m["spec"].update(
            serveConfigV2=m["spec"]["serveConfigV2"].replace("models:", "model:")
        ),
        "args:",
    ),
    "a Serve config Ray refuses": (
        "rayservice.yaml",
        lambda m: m["spec"].update(serveConfigV2="applications: {name: x}"),
        "serveConfigV2:",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_a_broken_manifest_is_refused_with_the_reason(case: str):
    path, change, reason = BREAKAGES[case]
    found = _broken(path, change)
    assert any(reason in problem for problem in found), found


def test_the_serve_builder_builds_the_reward_app_from_rayservice_args():
    """What Serve calls with serveConfigV2's args: the application with a scorer per model."""
    from pipelines.rm.serving import RewardAppArgs, build_app

    (service,) = manifests("RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    args = RewardAppArgs.model_validate(app["args"] | {"config": None})
    built = build_app(args)
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="models"):
        RewardAppArgs.model_validate({"models": {}})

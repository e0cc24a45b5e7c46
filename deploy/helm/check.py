#!/usr/bin/env python3
"""Lint, render and validate the janus Helm chart offline.

Run through deploy/helm/check.sh (which provides a venv with helm-python-sdk, PyYAML and
kubernetes-validate). For each scenario below the chart is linted (strict) and rendered with
`helm template` semantics; every rendered manifest is validated against the Kubernetes
1.31 JSON schemas with `kubernetes-validate --strict`, and the manifests are checked for what the
chart promises (probes, security context, GPU placement, selectors that select, the gateway's
backend addresses, HPA/PDB/ServiceMonitor targets). Some values must be refused by the schema.

ServiceMonitor is a CRD: kubernetes-validate has no schema for it (it only warns), so its shape
is checked here instead.

Exit status 0 when everything passes; the last line is "N passed, M failed".
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python as helm
import yaml

HERE = Path(__file__).resolve().parent
CHART = HERE / "janus"
KUBE_VERSION = "1.31.0"
RELEASE = "janus-ci"
NAMESPACE = "inference"
MODEL_COMPONENTS = ("understanding", "generation")
# A startup budget that covers reading ~15 GB of weights from a slow volume.
MIN_MODEL_STARTUP_SECONDS = 20 * 60


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


GPU = yaml.safe_load((CHART / "values-gpu.yaml").read_text())

EVERYTHING_ON = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"},
                       "metricRelabelings": [{"action": "drop", "regex": "go_.*", "sourceLabels": ["__name__"]}]},
    "otel": {"endpoint": "http://otel-collector.observability.svc:4317",
             "sampler": "parentbased_traceidratio", "samplerArg": "0.25",
             "resourceAttributes": "deployment.environment=ci"},
    "gateway": {"autoscaling": {"enabled": True, "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}},
                "pdb": {"minAvailable": 1},
                "http": {"allowedHosts": ["janus.example.com", "api.example.com:8443"],
                         "corsOrigins": ["https://app.example.com"]}},
    "understanding": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3,
                                      "targetCPUUtilizationPercentage": None,
                                      "metrics": [{"type": "Pods", "pods": {
                                          "metric": {"name": "janus_queue_depth"},
                                          "target": {"type": "AverageValue", "averageValue": "4"}}}]}},
    "generation": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2},
                   "pdb": {"minAvailable": "50%"}},
    "imagePullSecrets": [{"name": "registry-creds"}],
    "extraObjects": [{"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "{{ .Release.Name }}-extra"}, "data": {"a": "b"}}],
}

SCENARIOS: dict[str, dict] = {
    "default": {},
    "gpu": GPU,
    "gpu+servicemonitor+hpa+otel": deep_merge(GPU, EVERYTHING_ON),
    "pvc": {"model": {"source": "pvc", "pvc": {"claimName": "janus-pro-7b", "subPath": "Janus-Pro-7B"}},
            "gateway": {"understandingBackends": ["und-a:50052", "und-b:50052"]}},
    "hostPath": {"model": {"source": "hostPath", "hostPath": {"path": "/srv/models/Janus-Pro-7B"}}},
    "download-to-pvc": {"model": {"download": {"revision": "main", "hfTokenSecret": {"name": "hf-token"},
                                               "volume": {"type": "pvc", "claimName": "model-cache"}}}},
    "keys+tls+mtls": {"apiKeys": {"secretName": "janus-api-keys", "onModelServices": True, "reflectionRequiresKey": True},
                      "tls": {"gatewaySecretName": "janus-public-tls",
                              "internal": {"enabled": True, "servicesSecretName": "janus-services-tls",
                                           "gatewayClientSecretName": "janus-gateway-client-tls"}}},
    "public-tls+keys only": {"apiKeys": {"secretName": "janus-api-keys"},
                             "tls": {"gatewaySecretName": "janus-public-tls"}},
    "gateway-only": {"understanding": {"enabled": False}, "generation": {"enabled": False},
                     "gateway": {"understandingBackends": ["und.other-ns.svc:50052"],
                                 "generationBackends": ["gen.other-ns.svc:50053"]}},
}

# Values the schema (or a template `required`) must refuse.
MUST_FAIL: dict[str, dict] = {
    "pvc without claimName": {"model": {"source": "pvc"}},
    "hostPath without path": {"model": {"source": "hostPath"}},
    "download to pvc without claimName": {"model": {"download": {"volume": {"type": "pvc"}}}},
    "unknown model source": {"model": {"source": "s3"}},
    "misspelt component key": {"generation": {"replicas": 2}},
    "port as string": {"gateway": {"port": "50051"}},
    "bad dtype": {"engine": {"dtype": "f16"}},
    "bad sampler": {"otel": {"sampler": "sometimes"}},
    "bad hub id": {"model": {"download": {"repoId": "not a repo"}}},
    "mTLS without Secrets": {"tls": {"internal": {"enabled": True}}},
    "misspelt tls key": {"tls": {"gatewaySecret": "x"}},
    "api key Secret key empty": {"apiKeys": {"secretName": "k", "key": ""}},
    "CORS origin with a path": {"gateway": {"http": {"corsOrigins": ["https://app.example.com/"]}}},
    "CORS origin without a scheme": {"gateway": {"http": {"corsOrigins": ["app.example.com"]}}},
    "allowed host with a path": {"gateway": {"http": {"allowedHosts": ["janus.example.com/v1"]}}},
}


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.items.append(what)


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(values)
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            if not text.strip():
                raise AssertionError("NOTES.txt rendered empty")
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__template__", path)
                docs.append(doc)
    return docs


def lint(values: dict, f: Failures) -> None:
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v" + KUBE_VERSION)
    for m in report.get("messages", []):
        f.check(m.get("severity", 0) < 2, f"helm lint: {m}")
    for e in report.get("errors", []):
        f.check(False, f"helm lint error: {e}")


def kube_validate(docs: list[dict], f: Failures, workdir: Path) -> None:
    """kubernetes-validate --strict on every manifest whose kind it has a schema for."""
    builtin = [d for d in docs if d["apiVersion"] != "monitoring.coreos.com/v1"]
    path = workdir / "rendered.yaml"
    path.write_text(yaml.safe_dump_all([{k: v for k, v in d.items() if k != "__template__"} for d in builtin]))
    proc = subprocess.run(
        ["kubernetes-validate", "-k", KUBE_VERSION, "--strict", "--quiet", str(path)],
        capture_output=True, text=True,
    )
    out = (proc.stdout + proc.stderr).strip()
    f.check(proc.returncode == 0, f"kubernetes-validate failed:\n{out}")
    f.check("Couldn't find schema" not in out, f"kubernetes-validate lacks a schema for a built-in kind:\n{out}")


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def check_security(where: str, comp: str, merged: dict, pod: dict, main: dict, f: Failures) -> None:
    """API keys from the Secret, TLS files from mounted kubernetes.io/tls Secrets, health port iff TLS."""
    env = {e["name"]: e for e in main.get("env", [])}
    keys, tls = merged["apiKeys"], merged["tls"]
    is_model = comp in MODEL_COMPONENTS
    want_keys = bool(keys["secretName"]) and (not is_model or keys["onModelServices"])
    f.check(("JANUS_API_KEYS" in env) == want_keys, f"{where}: JANUS_API_KEYS iff keys are configured")
    if want_keys:
        ref = env["JANUS_API_KEYS"].get("valueFrom", {}).get("secretKeyRef")
        f.check(ref == {"name": keys["secretName"], "key": keys["key"]}, f"{where}: API keys from the Secret, {ref}")
        f.check(("JANUS_REFLECTION_REQUIRES_KEY" in env) == keys["reflectionRequiresKey"], f"{where}: reflection key flag")
    mounts = {m["mountPath"]: m for m in main.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def from_secret(var: str, secret: str, file: str) -> None:
        value = env.get(var, {}).get("value")
        f.check(value is not None, f"{where}: {var} set")
        if value is None:
            return
        directory, _, base = value.rpartition("/")
        f.check(base == file, f"{where}: {var} names {file}")
        m = mounts.get(directory)
        f.check(m is not None and m.get("readOnly") is True, f"{where}: {directory} mounted read-only")
        if m:
            vol = volumes.get(m["name"], {})
            f.check(vol.get("secret", {}).get("secretName") == secret, f"{where}: {var} from Secret {secret}")

    if is_model:
        tls_on = tls["internal"]["enabled"]
        if tls_on:
            for var, file in (("JANUS_TLS_CERT", "tls.crt"), ("JANUS_TLS_KEY", "tls.key"), ("JANUS_TLS_CLIENT_CA", "ca.crt")):
                from_secret(var, tls["internal"]["servicesSecretName"], file)
        else:
            f.check("JANUS_TLS_CERT" not in env, f"{where}: no TLS without tls.internal")
    else:
        tls_on = bool(tls["gatewaySecretName"])
        if tls_on:
            for var, file in (("JANUS_TLS_CERT", "tls.crt"), ("JANUS_TLS_KEY", "tls.key")):
                from_secret(var, tls["gatewaySecretName"], file)
        f.check("JANUS_TLS_CLIENT_CA" not in env, f"{where}: the public port asks no client certificate")
        if tls["internal"]["enabled"]:
            for var, file in (("JANUS_BACKEND_CA", "ca.crt"), ("JANUS_BACKEND_TLS_CERT", "tls.crt"),
                              ("JANUS_BACKEND_TLS_KEY", "tls.key")):
                from_secret(var, tls["internal"]["gatewayClientSecretName"], file)
        else:
            f.check("JANUS_BACKEND_CA" not in env, f"{where}: plaintext backends without tls.internal")
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    f.check(("health" in ports) == tls_on, f"{where}: health port iff TLS")
    if tls_on:
        f.check(ports["health"] == tls["healthPort"], f"{where}: health port number")
        f.check(env.get("JANUS_HEALTH_LISTEN", {}).get("value") == f"0.0.0.0:{tls['healthPort']}", f"{where}: JANUS_HEALTH_LISTEN")
    else:
        f.check("JANUS_HEALTH_LISTEN" not in env, f"{where}: no health port without TLS")


def check_manifests(name: str, values: dict, docs: list[dict], f: Failures) -> None:
    merged = deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), values)
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in by_kind(docs, "Deployment")}
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    enabled = [c for c in ("gateway", *MODEL_COMPONENTS) if merged[c]["enabled"]]
    f.check(sorted(deployments) == sorted(enabled), f"{name}: deployments {sorted(deployments)} != {enabled}")

    for d in docs:
        f.check(len(d["metadata"]["name"]) <= 63, f"{name}: name too long {d['metadata']['name']}")
        f.check(d["metadata"].get("namespace", NAMESPACE) == NAMESPACE, f"{name}: namespace of {d['metadata']['name']}")

    for comp, dep in deployments.items():
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"]["labels"]
        where = f"{name}/{comp}"
        f.check(selects(spec["selector"]["matchLabels"], labels), f"{where}: selector does not select its pods")
        f.check(pod["securityContext"].get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot")
        f.check(pod.get("enableServiceLinks") is False, f"{where}: enableServiceLinks")
        f.check(pod.get("automountServiceAccountToken") is False, f"{where}: token automount")
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c.get("securityContext", {})
            f.check(sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}: readOnlyRootFilesystem")
            f.check(sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}: allowPrivilegeEscalation")
            f.check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}/{c['name']}: drop ALL")
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            f.check("/tmp" in mounts, f"{where}/{c['name']}: writable /tmp")
        main = pod["containers"][0]
        env = env_of(main)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        f.check(ports.get("grpc") == merged[comp]["port"], f"{where}: grpc port")
        f.check(ports.get("metrics") == merged["metrics"]["port"], f"{where}: metrics port")
        f.check(env.get("JANUS_LISTEN") == f"0.0.0.0:{ports['grpc']}", f"{where}: JANUS_LISTEN")
        f.check(env.get("JANUS_METRICS_LISTEN") == f"0.0.0.0:{ports['metrics']}", f"{where}: JANUS_METRICS_LISTEN")
        f.check(env.get("OTEL_SERVICE_NAME") == f"janus-{comp}", f"{where}: OTEL_SERVICE_NAME")
        f.check(("OTEL_EXPORTER_OTLP_ENDPOINT" in env) == bool(merged["otel"]["endpoint"]), f"{where}: OTLP endpoint iff configured")
        f.check(float(env["JANUS_GRACE_PERIOD"]) < pod["terminationGracePeriodSeconds"], f"{where}: grace period inside termination grace")
        health = merged[comp]["probes"]["healthService"]
        check_security(where, comp, merged, pod, main, f)
        # With TLS on the gRPC port the probes use the plaintext health-only port.
        probe_port = ports.get("health", ports["grpc"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = main.get(probe)
            f.check(p is not None and "grpc" in p, f"{where}: {probe} is a native gRPC probe")
            if p and "grpc" in p:
                f.check(p["grpc"]["port"] == probe_port, f"{where}: {probe} port")
                if probe != "livenessProbe":
                    f.check(p["grpc"].get("service", "") == health, f"{where}: {probe} service {p['grpc'].get('service')!r}")
        if comp in MODEL_COMPONENTS:
            sp = main["startupProbe"]
            budget = sp["periodSeconds"] * sp["failureThreshold"]
            f.check(budget >= MIN_MODEL_STARTUP_SECONDS, f"{where}: startup budget {budget}s < {MIN_MODEL_STARTUP_SECONDS}s")
            f.check(health in ("janus.v1.Understanding", "janus.v1.Generation"), f"{where}: health service {health}")
            model_mount = [m for m in main["volumeMounts"] if m["name"] == "model"]
            f.check(len(model_mount) == 1 and model_mount[0].get("readOnly") is True, f"{where}: model mounted read-only")
            f.check(env.get("JANUS_MODEL") == merged["model"]["mountPath"], f"{where}: JANUS_MODEL")
            f.check(env.get("HF_HUB_OFFLINE") == "1", f"{where}: HF_HUB_OFFLINE")
            vol = next(v for v in pod["volumes"] if v["name"] == "model")
            src = merged["model"]["source"]
            inits = [c["name"] for c in pod.get("initContainers", [])]
            if src == "download":
                f.check(inits == ["download-model"], f"{where}: download init container")
                init = pod["initContainers"][0]
                ienv = {e["name"]: e for e in init["env"]}
                f.check(ienv["JANUS_REPO_ID"]["value"] == merged["model"]["download"]["repoId"], f"{where}: repo id")
                tok = merged["model"]["download"]["hfTokenSecret"]
                f.check(("HF_TOKEN" in ienv) == bool(tok["name"]), f"{where}: HF_TOKEN iff a secret is named")
                if tok["name"]:
                    ref = ienv["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
                    f.check(ref == {"name": tok["name"], "key": tok["key"]}, f"{where}: HF_TOKEN secret ref")
                want = "persistentVolumeClaim" if merged["model"]["download"]["volume"]["type"] == "pvc" else "emptyDir"
                f.check(want in vol, f"{where}: download volume {vol}")
            else:
                f.check(inits == [], f"{where}: no init container for {src}")
                f.check(("persistentVolumeClaim" if src == "pvc" else "hostPath") in vol, f"{where}: model volume {vol}")
        else:
            for backend_comp in MODEL_COMPONENTS:
                listed = merged["gateway"][f"{backend_comp}Backends"]
                value = env.get(f"JANUS_{backend_comp.upper()}_BACKENDS")
                if listed:
                    f.check(value == ",".join(listed), f"{where}: {backend_comp} backends {value!r}")
                elif merged[backend_comp]["enabled"]:
                    # The headless Service of the component, by its full name (one backend per pod).
                    host, _, port = value.partition(":")
                    short, dot, rest = host.partition(".")
                    f.check(rest == f"{NAMESPACE}.svc.cluster.local", f"{where}: backend {value} is not a full cluster name")
                    svc = services.get(short)
                    f.check(svc is not None, f"{where}: backend {value} is not a Service of the release")
                    if svc:
                        f.check(svc["spec"].get("clusterIP") == "None", f"{where}: backend Service {short} is not headless")
                        f.check(any(p["port"] == int(port) and p["name"] == "grpc" for p in svc["spec"]["ports"]),
                                f"{where}: backend port {port}")
                        f.check(selects(svc["spec"]["selector"], deployments[backend_comp]["spec"]["template"]["metadata"]["labels"]),
                                f"{where}: backend Service selects the {backend_comp} pods")
        hpa_on = merged[comp]["autoscaling"]["enabled"]
        f.check(("replicas" in spec) != hpa_on, f"{where}: replicas set iff no HPA")

    # Services select exactly their component's pods, with grpc and metrics ports (and the
    # gateway's OpenAI-compatible http port when enabled, on its container too).
    for svc in services.values():
        matched = [c for c, d in deployments.items() if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        f.check(len(matched) == 1, f"{name}: Service {svc['metadata']['name']} selects {matched}")
        headless = svc["spec"].get("clusterIP") == "None"
        want_ports = {"grpc"} if headless else {"grpc", "metrics"}
        if matched == ["gateway"] and not headless and merged["gateway"]["http"]["enabled"]:
            want_ports.add("http")
            container = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
            f.check(any(p["name"] == "http" and p["containerPort"] == merged["gateway"]["http"]["port"]
                        for p in container["ports"]), f"{name}: gateway container http port")
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            f.check(env.get("JANUS_HTTP_LISTEN") == f"0.0.0.0:{merged['gateway']['http']['port']}",
                    f"{name}: gateway JANUS_HTTP_LISTEN")
            # The HTTP port answers to the gateway Service's in-cluster names (and the values'
            # hosts); CORS only for the values' origins.
            svc_name = svc["metadata"]["name"]
            want_hosts = [svc_name, f"{svc_name}.{NAMESPACE}", f"{svc_name}.{NAMESPACE}.svc",
                          f"{svc_name}.{NAMESPACE}.svc.cluster.local", *merged["gateway"]["http"]["allowedHosts"]]
            f.check(env.get("JANUS_ALLOWED_HOSTS") == ",".join(want_hosts),
                    f"{name}: gateway JANUS_ALLOWED_HOSTS {env.get('JANUS_ALLOWED_HOSTS')!r}")
            origins = merged["gateway"]["http"]["corsOrigins"]
            f.check(env.get("JANUS_CORS_ORIGINS") == (",".join(origins) if origins else None),
                    f"{name}: gateway JANUS_CORS_ORIGINS {env.get('JANUS_CORS_ORIGINS')!r}")
        f.check({p["name"] for p in svc["spec"]["ports"]} == want_ports, f"{name}: Service ports")
    # Each enabled model component has a headless Service (the gateway's discovery).
    for comp in MODEL_COMPONENTS:
        if merged[comp]["enabled"]:
            f.check(sum(1 for svc in services.values() if svc["spec"].get("clusterIP") == "None"
                        and selects(svc["spec"]["selector"], deployments[comp]["spec"]["template"]["metadata"]["labels"])) == 1,
                    f"{name}: one headless Service for {comp}")
            env = {e["name"]: e.get("value") for e in deployments[comp]["spec"]["template"]["spec"]["containers"][0]["env"]}
            f.check(env.get("JANUS_MAX_CONNECTION_AGE") == str(merged[comp]["maxConnectionAgeSeconds"]),
                    f"{name}: {comp} JANUS_MAX_CONNECTION_AGE")

    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        f.check(any(d["metadata"]["name"] == ref["name"] for d in deployments.values()), f"{name}: HPA target {ref}")
        f.check(hpa["spec"].get("metrics"), f"{name}: HPA {hpa['metadata']['name']} has metrics")
    f.check(len(by_kind(docs, "HorizontalPodAutoscaler")) == sum(merged[c]["autoscaling"]["enabled"] for c in enabled), f"{name}: HPA count")

    pdbs = by_kind(docs, "PodDisruptionBudget")
    f.check(len(pdbs) == sum(merged[c]["pdb"]["enabled"] for c in enabled), f"{name}: PDB count")
    for pdb in pdbs:
        sel = pdb["spec"]["selector"]["matchLabels"]
        f.check(sum(selects(sel, d["spec"]["template"]["metadata"]["labels"]) for d in deployments.values()) == 1,
                f"{name}: PDB {pdb['metadata']['name']} selects one deployment")
        f.check(("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"]), f"{name}: PDB sets exactly one bound")

    monitors = by_kind(docs, "ServiceMonitor")
    f.check(len(monitors) == (1 if merged["serviceMonitor"]["enabled"] else 0), f"{name}: ServiceMonitor count")
    for sm in monitors:
        f.check(sm["apiVersion"] == "monitoring.coreos.com/v1", f"{name}: ServiceMonitor apiVersion")
        sel = sm["spec"]["selector"]["matchLabels"]
        picked = [s for s in services.values() if selects(sel, s["metadata"]["labels"])]
        f.check(len(picked) == len(services), f"{name}: ServiceMonitor selects {len(picked)}/{len(services)} Services")
        f.check(sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}, f"{name}: ServiceMonitor namespace")
        for ep in sm["spec"]["endpoints"]:
            f.check(ep["port"] == "metrics" and ep["path"] == "/metrics", f"{name}: ServiceMonitor endpoint {ep}")
            f.check(set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings", "metricRelabelings"},
                    f"{name}: ServiceMonitor endpoint keys {sorted(ep)}")
        for k, v in merged["serviceMonitor"]["labels"].items():
            f.check(sm["metadata"]["labels"].get(k) == v, f"{name}: ServiceMonitor label {k}")

    if merged["engine"]["device"].startswith("cuda"):
        for comp in MODEL_COMPONENTS:
            pod = deployments[comp]["spec"]["template"]["spec"]
            main = pod["containers"][0]
            where = f"{name}/{comp}"
            f.check(main["resources"]["limits"].get("nvidia.com/gpu") == 1, f"{where}: nvidia.com/gpu limit 1")
            f.check(pod.get("runtimeClassName") == "nvidia", f"{where}: runtimeClassName nvidia")
            f.check(bool(pod.get("nodeSelector")), f"{where}: GPU nodeSelector")
            f.check(any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f"{where}: GPU toleration")
            anti = pod.get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", [])
            f.check(any(t["topologyKey"] == "kubernetes.io/hostname" for t in anti), f"{where}: one model pod per node")
            f.check(env_of(main).get("JANUS_DEVICE", "").startswith("cuda"), f"{where}: JANUS_DEVICE cuda")
            f.check(main["image"].endswith("-cuda"), f"{where}: CUDA image tag {main['image']}")


def main() -> int:
    passed, failed = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, values in SCENARIOS.items():
            f = Failures()
            try:
                lint(values, f)
                docs = render(values)
                kinds = sorted({d["kind"] for d in docs})
                work = Path(tmp) / name.replace("/", "_").replace("+", "_")
                work.mkdir()
                kube_validate(docs, f, work)
                check_manifests(name, values, docs, f)
            except Exception as e:  # render or schema failure
                f.check(False, f"{type(e).__name__}: {e}")
                kinds = []
            if f.items:
                failed += 1
                print(f"FAIL {name}")
                for item in f.items:
                    print(f"  - {item}")
            else:
                passed += 1
                print(f"ok   {name}: {len(kinds)} kinds ({', '.join(kinds)})")
        for name, values in MUST_FAIL.items():
            try:
                render(values)
            except Exception as e:
                passed += 1
                first = str(e).strip().splitlines()
                print(f"ok   refused: {name} ({first[-1].strip() if first else type(e).__name__})")
            else:
                failed += 1
                print(f"FAIL accepted: {name}")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Run the CPU image the way the Helm chart runs it, and check the chart against the image.

Called by deploy/docker/check.sh after it built the image (podman with runc); needs the venv of
deploy/helm/check.sh (helm-python-sdk, PyYAML). Nothing here is hand-written per component: the
chart is rendered (release janus-check, namespace docker-check, model.source=hostPath on the
tiny fixture, image = the image just built) and every Deployment's pod spec is translated into a
`podman run`:

  command/args           --entrypoint <command> <image> <args>  (the image has no ENTRYPOINT)
  env (value, fieldRef,  -e NAME=VALUE, $(VAR) expanded the way the kubelet does
  $(VAR) references)
  ports                  each containerPort published on 127.0.0.1 (a random host port)
  pod + container        --user runAsUser:runAsGroup, --group-add fsGroup, --read-only,
  securityContext        --cap-drop, --security-opt no-new-privileges (unknown keys fail)
  volumes                emptyDir -> tmpfs of sizeLimit, hostPath -> bind mount (ro when the
                         mount says readOnly); anything else fails
  resources.limits       --memory
  Services               DNS names on a podman network (aardvark-dns): <svc>, <svc>.<ns>,
                         <svc>.<ns>.svc, <svc>.<ns>.svc.cluster.local of every Service selecting
                         the pod, so the gateway's rendered backend addresses resolve unchanged
  probes                 grpc.health.v1 Check from the host on <pod IP>:<probe port> with the
                         probe's service (the host's `janus health`), within the probe budget
  termination            `podman stop --time terminationGracePeriodSeconds` (SIGTERM, then KILL)

Each container gets its own network namespace, so every role listens on the chart's ports
(three pods on 9464, as in a cluster) and a server bound to 127.0.0.1 would fail the probes.

Exit status 0 when every check passes; the last line is "N passed, M failed".
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import helm_python as helm
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHART = REPO / "deploy" / "helm" / "janus"
RELEASE = "janus-check"
NAMESPACE = "docker-check"
NETWORK = "janus-check"
LABEL = "janus-docker-check=1"
FIXTURE = REPO / "tests" / "fixtures" / "janus-tiny"
# Env vars the chart sets only for $(VAR) references in other values.
REFERENCE_ONLY_ENV = {"POD_NAME", "POD_NAMESPACE"}
# The probes are polled this often (the kubelet's periodSeconds would only slow the check down);
# the budget is the chart's (periodSeconds x failureThreshold), capped for a tiny checkpoint.
POLL_S = 0.5
MAX_STARTUP_S = 180.0

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []
        self.notes: list[str] = []

    def note(self, what: str) -> None:
        self.notes.append(what)
        print(f"note {what}", flush=True)

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok   {what}", flush=True)
        else:
            self.failed.append(what)
            print(f"FAIL {what}" + (f"\n     {detail}" if detail else ""), flush=True)
        return ok


def run(cmd: list[str], timeout: float = 120, check: bool = False, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p


# ----------------------------------------------------------------------------- chart

def render(values: dict, name: str = RELEASE, namespace: str = NAMESPACE) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(values)
    manifests = chart.render(values, name=name, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def component_of(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def chart_scenarios() -> dict[str, dict]:
    """The value sets deploy/helm/check.py renders (keys, TLS, OTLP, GPU, ...)."""
    sys.dont_write_bytecode = True  # no __pycache__ in deploy/helm
    spec = importlib.util.spec_from_file_location("janus_helm_check", REPO / "deploy" / "helm" / "check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return dict(mod.SCENARIOS)


def quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    if not m:
        raise ValueError(f"unsupported quantity {q!r}")
    mult = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
            "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    return int(m.group(1)) * mult


def resolve_env(env: list[dict], pod_name: str) -> dict[str, str]:
    """Values as the kubelet passes them: fieldRefs filled in, $(VAR) of earlier entries expanded."""
    out: dict[str, str] = {}
    for e in env:
        if "value" in e:
            raw = str(e["value"])
        elif "valueFrom" in e and "fieldRef" in e["valueFrom"]:
            field = e["valueFrom"]["fieldRef"]["fieldPath"]
            raw = {"metadata.name": pod_name, "metadata.namespace": NAMESPACE}.get(field)
            if raw is None:
                raise ValueError(f"env {e['name']}: fieldRef {field} not emulated")
            out[e["name"]] = raw
            continue
        else:
            raise ValueError(f"env {e['name']}: {e.get('valueFrom')} not emulated (no Secrets here)")

        def sub(m: re.Match) -> str:
            if m.group(0).startswith("$$"):
                return m.group(0)[1:]
            return out.get(m.group(1), m.group(0))

        out[e["name"]] = re.sub(r"\$\$\([A-Za-z_][A-Za-z0-9_]*\)|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, raw)
    return out


def service_names(docs: list[dict], pod_labels: dict) -> list[str]:
    names = []
    for d in docs:
        if d["kind"] != "Service":
            continue
        sel = d["spec"].get("selector") or {}
        if sel and all(pod_labels.get(k) == v for k, v in sel.items()):
            s, ns = d["metadata"]["name"], d["metadata"].get("namespace", NAMESPACE)
            names += [s, f"{s}.{ns}", f"{s}.{ns}.svc", f"{s}.{ns}.svc.cluster.local"]
    return names


def podman_run_args(podman: list[str], docs: list[dict], dep: dict) -> tuple[list[str], dict]:
    """`podman run -d ...` for the main container of a Deployment, and facts for the checks."""
    name = dep["metadata"]["name"]
    tmpl = dep["spec"]["template"]
    pod = tmpl["spec"]
    (c,) = [x for x in pod["containers"]]
    pod_name = f"{name}-0"
    known_pod_sc = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "fsGroupChangePolicy", "seccompProfile"}
    known_c_sc = {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsNonRoot", "capabilities",
                  "runAsUser", "runAsGroup"}
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if set(psc) - known_pod_sc or set(csc) - known_c_sc:
        raise ValueError(f"{name}: securityContext keys not emulated: {sorted(set(psc) - known_pod_sc)} "
                         f"{sorted(set(csc) - known_c_sc)}")
    if psc.get("seccompProfile", {}).get("type", "RuntimeDefault") != "RuntimeDefault":
        raise ValueError(f"{name}: seccompProfile {psc['seccompProfile']} not emulated")
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    env = resolve_env(c.get("env", []), pod_name)
    if c.get("envFrom"):
        raise ValueError(f"{name}: envFrom not emulated")

    args = [*podman, "run", "-d", "--name", name, "--hostname", pod_name, "--label", LABEL,
            "--network", NETWORK, "--pull", "never"]
    for alias in service_names(docs, tmpl["metadata"]["labels"]):
        args += ["--network-alias", alias]
    if uid is not None:
        args += ["--user", f"{uid}:{gid if gid is not None else uid}"]
    if psc.get("fsGroup") is not None:
        args += ["--group-add", str(psc["fsGroup"])]
    if csc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    if csc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for cap in csc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    for cap in csc.get("capabilities", {}).get("add", []):
        args += ["--cap-add", cap]
    mem = c.get("resources", {}).get("limits", {}).get("memory")
    if mem:
        args += ["--memory", str(quantity_bytes(mem))]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        if m.get("subPath"):
            raise ValueError(f"{name}: subPath mounts not emulated")
        if "emptyDir" in v:
            size = v["emptyDir"].get("sizeLimit")
            opt = f"type=tmpfs,destination={m['mountPath']},tmpfs-mode=0777"
            if size:
                opt += f",tmpfs-size={quantity_bytes(size)}"
            args += ["--mount", opt]
        elif "hostPath" in v:
            ro = ",ro" if m.get("readOnly") else ""
            args += ["--mount", f"type=bind,source={v['hostPath']['path']},destination={m['mountPath']}{ro}"]
        else:
            raise ValueError(f"{name}: volume {v} not emulated")
    for k, val in env.items():
        args += ["-e", f"{k}={val}"]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for p in ports.values():
        args += ["-p", f"127.0.0.1::{p}"]
    args += ["--entrypoint", json.dumps(c["command"]), c["image"], *c.get("args", [])]
    facts = {"name": name, "container": c, "pod": pod, "env": env, "ports": ports, "uid": uid, "gid": gid}
    return args, facts


# ----------------------------------------------------------------------------- podman helpers

class Podman:
    def __init__(self, base: list[str]) -> None:
        self.base = base

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return run([*self.base, *args], timeout=timeout, check=check)

    def inspect(self, name: str) -> dict:
        return json.loads(self("inspect", name).stdout)[0]

    def host_port(self, name: str, container_port: int) -> int:
        ports = self.inspect(name)["NetworkSettings"]["Ports"]
        return int(ports[f"{container_port}/tcp"][0]["HostPort"])

    def ip(self, name: str) -> str:
        return self.inspect(name)["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]

    def running(self, name: str) -> bool:
        return self.inspect(name)["State"]["Running"]

    def logs(self, name: str) -> str:
        p = self("logs", name, check=False)
        return p.stdout + p.stderr

    def cleanup(self) -> None:
        ids = self("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
        if ids:
            self("rm", "-f", "-t", "0", *ids, check=False)
        if self("network", "exists", NETWORK, check=False).returncode == 0:
            self("network", "rm", "-f", NETWORK, check=False)


def http_get(url: str, host: str | None = None, timeout: float = 10) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def http_post_json(url: str, body: dict, timeout: float = 120) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def oneline(text: str) -> str:
    return " | ".join(l.strip() for l in text.strip().splitlines())


def listen_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


# ----------------------------------------------------------------------------- checks

def image_checks(ck: Checks, pm: Podman, image: str, docs: list[dict], facts: dict[str, dict],
                 scenarios: dict[str, list[dict]]) -> None:
    info = json.loads(pm("image", "inspect", image).stdout)[0]
    cfg = info.get("Config", {})
    img_env = dict(e.split("=", 1) for e in cfg.get("Env", []))
    exposed = {int(p.split("/")[0]) for p in (cfg.get("ExposedPorts") or {})}
    ck.check(not cfg.get("Entrypoint"), f"image has no ENTRYPOINT (the chart's `command` is the whole command line): {cfg.get('Entrypoint')}")
    user = cfg.get("User", "")
    for comp, f in facts.items():
        pod = f["pod"]
        ck.check(user == f"{f['uid']}:{f['gid']}", f"{comp}: chart runs as {f['uid']}:{f['gid']}, image USER {user!r}")
        fs_group = pod.get("securityContext", {}).get("fsGroup")
        ck.check(fs_group in (None, f["gid"]), f"{comp}: fsGroup {fs_group} = runAsGroup {f['gid']}")
        ck.check(set(f["ports"].values()) <= exposed,
                 f"{comp}: container ports {sorted(f['ports'].values())} are EXPOSEd by the image {sorted(exposed)}")
        env = f["env"]
        for var, port_name in (("JANUS_LISTEN", "grpc"), ("JANUS_METRICS_LISTEN", "metrics"),
                               ("JANUS_HTTP_LISTEN", "http"), ("JANUS_HEALTH_LISTEN", "health")):
            if var in env or port_name in f["ports"]:
                host, port = listen_port(env.get(var, ":0"))
                ck.check(host in ("0.0.0.0", "[::]") and port == f["ports"].get(port_name),
                         f"{comp}: {var}={env.get(var)} listens on all interfaces at containerPort {port_name}={f['ports'].get(port_name)}")
        c = f["container"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            pr = c.get(kind, {})
            ck.check("grpc" in pr and pr["grpc"]["port"] in f["ports"].values(),
                     f"{comp}: {kind} is gRPC on a declared container port ({pr.get('grpc')})")
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", []) if not m.get("readOnly")}
        ck.check(cfg.get("WorkingDir") in mounts,
                 f"{comp}: WORKDIR {cfg.get('WorkingDir')} is a writable volume (read-only root filesystem)")
        hf_home = env.get("HF_HOME", img_env.get("HF_HOME", ""))
        ck.check(any(hf_home == m or hf_home.startswith(m.rstrip("/") + "/") for m in mounts),
                 f"{comp}: HF_HOME={hf_home} lies on a writable volume")
        grace = int(env.get("JANUS_GRACE_PERIOD", "30"))
        ck.check(pod["terminationGracePeriodSeconds"] >= grace + 5,
                 f"{comp}: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} >= JANUS_GRACE_PERIOD {grace} + 5")
        if "JANUS_MODEL" in env:
            mount = next((m for m in c["volumeMounts"] if m["name"] == "model"), {})
            ck.check(env["JANUS_MODEL"] == mount.get("mountPath") == img_env.get("JANUS_MODEL"),
                     f"{comp}: JANUS_MODEL {env['JANUS_MODEL']} = model mount {mount.get('mountPath')} "
                     f"(readOnly {mount.get('readOnly')}) = image default {img_env.get('JANUS_MODEL')}")
            ck.check(bool(mount.get("readOnly")), f"{comp}: model mounted read-only")
            ck.check(env.get("HF_HOME") == img_env.get("HF_HOME"),
                     f"{comp}: HF_HOME {env.get('HF_HOME')} = image {img_env.get('HF_HOME')}")

    # What the image holds, seen from inside (as the image's user): the binaries the chart runs
    # on PATH, their libraries, their --help, and every variable name the chart sets (in any of
    # deploy/helm/check.py's value sets) present in the binary that reads it.
    wanted: dict[str, set[str]] = {}
    for sc_docs in scenarios.values():
        for d in sc_docs:
            if d["kind"] != "Deployment":
                continue
            c = d["spec"]["template"]["spec"]["containers"][0]
            wanted.setdefault(c["command"][0], set()).update(e["name"] for e in c.get("env", []))
    script = ["set -u", "for b in /usr/local/bin/*; do echo \"@@ldd $b\"; ldd \"$b\" 2>&1; done",
              "echo @@version; janus --version",
              "echo @@ls; ls -ld /models/janus /cache /usr/local/bin/* | awk '{print $1, $3, $4, $NF}'"]
    for b, names in sorted(wanted.items()):
        script.append(f"echo '@@which {b}'; command -v {shlex.quote(b)} || echo MISSING")
        script.append(f"echo '@@help {b}'; {shlex.quote(b)} --help")
        for n in sorted(names):
            script.append(f"echo \"%%strings {b} {n} $(grep -c -a -F {shlex.quote(n)} \"$(command -v {shlex.quote(b)})\")\"")
    p = pm("run", "--rm", "--pull", "never", "--network", "none", "--label", LABEL,
           "--entrypoint", '["/bin/sh","-c"]', image, "\n".join(script), check=False)
    ck.check(p.returncode == 0, "static probe of the image ran", p.stderr[-2000:])
    sections: dict[str, list[str]] = {}
    cur = None
    hits: dict[tuple[str, str], int] = {}
    for line in p.stdout.splitlines():
        if line.startswith("%%strings "):
            parts = line.split()
            hits[(parts[1], parts[2])] = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
        elif line.startswith("@@"):
            cur = line[2:]
            sections[cur] = []
        elif cur is not None:
            sections[cur].append(line)
    ldd = {k[4:]: v for k, v in sections.items() if k.startswith("ldd ")}
    for b, lines in sorted(ldd.items()):
        bad = [l.strip() for l in lines if "not found" in l or "not a dynamic" in l]
        ck.check(lines and not bad, f"ldd {b}: {len(lines)} libraries, all resolve in the image", "; ".join(bad))
    ck.check(any(l.startswith("janus ") for l in sections.get("version", [])), f"janus --version: {sections.get('version')}")
    print("     " + "\n     ".join(sections.get("ls", [])))
    for b, names in sorted(wanted.items()):
        where = sections.get(f"which {b}", ["MISSING"])
        ck.check(where and where[0] == f"/usr/local/bin/{b}", f"chart command {b!r} is on the image's PATH: {where}")
        helptext = "\n".join(sections.get(f"help {b}", []))
        for n in sorted(names - REFERENCE_ONLY_ENV):
            flag = re.search(rf"\[env: {re.escape(n)}[=\]]", helptext)
            count = hits.get((b, n), 0)
            ck.check(bool(flag) or count > 0,
                     f"{b} reads {n} ({'--help: ' + flag.group(0) if flag else f'name found {count}x in the binary'})")


def wait_probe(ck: Checks, janus: str, where: str, ip: str, probe: dict, budget_cap: float,
               pm: Podman, name: str) -> float | None:
    port = probe["grpc"]["port"]
    service = probe["grpc"].get("service", "")
    budget = min(probe["periodSeconds"] * probe["failureThreshold"], budget_cap)
    # The kubelet's gRPC probe is one Check call with the probe's service ("" when unset).
    cmd = [janus, "health", "--server", f"http://{ip}:{port}", "--timeout", str(probe["timeoutSeconds"]),
           "--service", service]
    start = time.monotonic()
    last = None
    while time.monotonic() - start < budget:
        last = run(cmd, timeout=probe["timeoutSeconds"] + 5)
        if last.returncode == 0:
            took = time.monotonic() - start
            ck.check(True, f"{where} on {ip}:{port} service {service!r}: {oneline(last.stdout)} after {took:.1f} s")
            return took
        if not pm.running(name):
            break
        time.sleep(POLL_S)
    ck.check(False, f"{where} on {ip}:{port} service {service!r}",
             (last.stdout + last.stderr if last else "") + "\n" + pm.logs(name)[-3000:])
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--janus", required=True, help="host janus binary (the client)")
    ap.add_argument("--podman", default="podman --runtime runc")
    ap.add_argument("--out", required=True, help="directory for outputs (generated PNGs, logs)")
    a = ap.parse_args()
    pm = Podman(shlex.split(a.podman))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ck = Checks()
    repo, _, tag = a.image.rpartition(":")

    values = {"image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
              "model": {"source": "hostPath", "hostPath": {"path": str(FIXTURE / "model")}}}
    docs = render(values)
    deps = {component_of(d): d for d in docs if d["kind"] == "Deployment"}
    ck.check(set(deps) == {"gateway", "understanding", "generation"}, f"chart renders three Deployments: {sorted(deps)}")
    scenario_docs = {"docker-check": docs}
    for sname, svals in chart_scenarios().items():
        scenario_docs[sname] = render(svals)
    log(f"chart rendered ({len(scenario_docs)} value sets for the variable-name check)")

    runs, facts = {}, {}
    for comp, d in deps.items():
        runs[comp], facts[comp] = podman_run_args(pm.base, docs, d)
        ck.check(facts[comp]["container"]["image"] == a.image, f"{comp}: chart image {facts[comp]['container']['image']}")
    image_checks(ck, pm, a.image, docs, facts, scenario_docs)
    log("static checks done")

    pm.cleanup()
    pm("network", "create", "--label", LABEL, NETWORK)
    try:
        return run_pods(ck, pm, a, out, runs, facts)
    finally:
        for comp, f in facts.items():
            (out / f"{comp}.log").write_text(pm.logs(f["name"]))
        pm.cleanup()


def run_pods(ck: Checks, pm: Podman, a: argparse.Namespace, out: Path, runs: dict, facts: dict) -> int:
    janus = a.janus
    # Model services first, then the gateway (the order does not matter to the gateway, which
    # waits for healthy backends; it only saves a few failed health checks in its log).
    order = ["understanding", "generation", "gateway"]
    for comp in order:
        p = run(runs[comp], timeout=60)
        ck.check(p.returncode == 0, f"{comp}: podman run {facts[comp]['name']}", p.stderr[-2000:])
        print("     " + shlex.join(runs[comp][len(pm.base):]))
    ips = {comp: pm.ip(facts[comp]["name"]) for comp in order}
    for comp in order:
        c, name = facts[comp]["container"], facts[comp]["name"]
        took = wait_probe(ck, janus, f"{comp}: startupProbe", ips[comp], c["startupProbe"], MAX_STARTUP_S, pm, name)
        if took is None:
            continue
        wait_probe(ck, janus, f"{comp}: readinessProbe", ips[comp], c["readinessProbe"], 30, pm, name)
        wait_probe(ck, janus, f"{comp}: livenessProbe", ips[comp], c["livenessProbe"], 30, pm, name)
        for pname, port in facts[comp]["ports"].items():
            ck.check(tcp_open(ips[comp], port), f"{comp}: port {pname} {port} answers on the pod IP {ips[comp]}")
    log("all pods ready")

    g = facts["gateway"]
    gw = f"http://127.0.0.1:{pm.host_port(g['name'], g['ports']['grpc'])}"
    # From inside the gateway container, with the image's own client.
    p = pm("exec", g["name"], "janus", "health", "--server", f"http://127.0.0.1:{g['ports']['grpc']}", check=False)
    ck.check(p.returncode == 0 and "SERVING" in p.stdout, f"podman exec gateway janus health: {oneline(p.stdout)}", p.stderr)
    p = run([janus, "health", "--server", gw])
    ck.check(p.returncode == 0 and "SERVING" in p.stdout, f"janus health --server {gw}: {oneline(p.stdout)}", p.stderr)
    # Both services answer through the gateway (device/dtype are the chart's JANUS_DEVICE/JANUS_DTYPE).
    deadline = time.monotonic() + 30
    while True:
        p = run([janus, "info", "--server", gw])
        if p.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    m_env = facts["understanding"]["env"]
    ck.check(p.returncode == 0 and p.stdout.count(f"device: {m_env['JANUS_DEVICE']}") == 2
             and p.stdout.count(f"dtype: {m_env['JANUS_DTYPE']}") == 2
             and p.stdout.count(f"model_path: {m_env['JANUS_MODEL']}") == 2,
             f"janus info through the gateway: both services, device {m_env['JANUS_DEVICE']}, dtype "
             f"{m_env['JANUS_DTYPE']}, model {m_env['JANUS_MODEL']}", p.stdout + p.stderr)

    image = FIXTURE / "square.png"
    t = time.monotonic()
    p = run([janus, "understand", "--server", gw, "--image", str(image), "--max-new-tokens", "16",
             "--seed", "1", "--timeout", "120", "What is this?"], timeout=180)
    ck.check(p.returncode == 0, f"janus understand --image {image.name} through the gateway: exit 0 in "
             f"{time.monotonic() - t:.1f} s, answer {p.stdout.strip()[:60]!r}", p.stderr[-2000:])
    gen_dir = out / "generate"
    gen_dir.mkdir(exist_ok=True)
    for f in gen_dir.glob("*"):
        f.unlink()
    t = time.monotonic()
    p = run([janus, "generate", "--server", gw, "--seed", "7", "--quiet", "--timeout", "180", "-o", str(gen_dir),
             "a red square"], timeout=240)
    pngs = sorted(gen_dir.glob("*.png"))
    ok = p.returncode == 0 and len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ck.check(ok, f"janus generate through the gateway: {[x.name for x in pngs]} "
             f"({pngs[0].stat().st_size if pngs else 0} bytes, PNG header) in {time.monotonic() - t:.1f} s",
             p.stdout + p.stderr[-2000:])

    # The OpenAI-compatible HTTP port (JANUS_HTTP_LISTEN), with the Host names the chart allows.
    if "http" in g["ports"]:
        hp = pm.host_port(g["name"], g["ports"]["http"])
        base = f"http://127.0.0.1:{hp}"
        code, body = http_get(f"{base}/v1/models")
        ids = [m["id"] for m in json.loads(body).get("data", [])] if code == 200 else []
        ck.check(code == 200 and ids, f"HTTP GET /v1/models on the gateway's http port: {code} {ids}", body[:500])
        allowed = g["env"].get("JANUS_ALLOWED_HOSTS", "").split(",")
        for h in allowed:
            code, body = http_get(f"{base}/v1/models", host=f"{h}:{g['ports']['http']}")
            ck.check(code == 200, f"HTTP Host {h} (JANUS_ALLOWED_HOSTS) answered: {code}", body[:300])
        code, body = http_get(f"{base}/v1/models", host="attacker.example")
        ck.check(code == 403, f"HTTP Host attacker.example refused: {code}", body[:300])
        code, body = http_get(f"{base}/openapi.json")
        ck.check(code == 200 and '"openapi"' in body, f"HTTP GET /openapi.json: {code}")
        if ids:
            data = base64.b64encode(image.read_bytes()).decode()
            code, resp = http_post_json(f"{base}/v1/chat/completions", {
                "model": ids[0], "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}]})
            ck.check(code == 200 and isinstance(resp, dict) and resp.get("choices"),
                     f"HTTP POST /v1/chat/completions with an image: {code}", str(resp)[:500])

    # Prometheus metrics of every pod (JANUS_METRICS_LISTEN), through the published port.
    expect = {"gateway": "janus_grpc_requests_total", "understanding": "janus_output_tokens_total",
              "generation": "janus_images_generated_total"}
    for comp in order:
        f = facts[comp]
        port = pm.host_port(f["name"], f["ports"]["metrics"])
        code, body = http_get(f"http://127.0.0.1:{port}/metrics")
        names = sorted({l.split("{")[0].split(" ")[0] for l in body.splitlines() if l.startswith("janus_")})
        ck.check(code == 200 and "janus_build_info" in names and expect[comp] in names,
                 f"{comp}: GET /metrics on containerPort {f['ports']['metrics']}: {code}, {len(names)} janus_ series "
                 f"incl. janus_build_info, {expect[comp]}", body[:500])

    # Termination: a generation request is in flight when the gateway and the generation pod get
    # SIGTERM together (a rollout); both drain it, the client gets its image, both exit 0 within
    # their grace period. The understanding pod is stopped idle.
    gen = facts["generation"]
    gen_metrics = f"http://127.0.0.1:{pm.host_port(gen['name'], gen['ports']['metrics'])}/metrics"
    drain_dir = out / "drain"
    drain_dir.mkdir(exist_ok=True)
    for f in drain_dir.glob("*"):
        f.unlink()
    client = subprocess.Popen([janus, "generate", "--server", gw, "--seed", "8", "-n", "4", "--quiet", "--timeout", "180",
                               "-o", str(drain_dir), "a blue circle"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    in_flight = False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and client.poll() is None:
        _, body = http_get(gen_metrics)
        if re.search(r'^janus_grpc_requests_in_flight\{[^}]*Generate[^}]*\} [1-9]', body, re.M):
            in_flight = True
            break
        time.sleep(0.1)
    ck.check(in_flight, "a generation stream is in flight on the generation pod before SIGTERM")
    results: dict[str, tuple[float, subprocess.CompletedProcess]] = {}

    def stop(comp: str) -> None:
        f = facts[comp]
        t = time.monotonic()
        p = pm("stop", "--time", str(f["pod"]["terminationGracePeriodSeconds"]), f["name"],
               timeout=f["pod"]["terminationGracePeriodSeconds"] + 30, check=False)
        results[comp] = (time.monotonic() - t, p)

    threads = [threading.Thread(target=stop, args=(c,)) for c in ("gateway", "generation")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop("understanding")
    try:
        cout, cerr = client.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        client.kill()
        cout, cerr = client.communicate()
    pngs = sorted(drain_dir.glob("*.png"))
    ck.check(client.returncode == 0 and len(pngs) == 4 and all(x.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for x in pngs),
             f"the in-flight generation finished during the drain: exit {client.returncode}, {[x.name for x in pngs]}",
             cout + cerr[-2000:])
    for comp in order:
        f = facts[comp]
        took, p = results[comp]
        state = pm.inspect(f["name"])["State"]
        grace = int(f["env"].get("JANUS_GRACE_PERIOD", "30"))
        ck.check(p.returncode == 0 and state["ExitCode"] == 0 and not state.get("OOMKilled") and took < grace,
                 f"{comp}: podman stop --time {f['pod']['terminationGracePeriodSeconds']}: exit code {state['ExitCode']} "
                 f"after {took:.1f} s (< JANUS_GRACE_PERIOD {grace} s)", p.stdout + p.stderr + pm.logs(f["name"])[-2000:])
        drained = [l for l in pm.logs(f["name"]).splitlines() if "drain" in l]
        ck.check(bool(drained), f"{comp}: logged its drain ({len(drained)} line(s))")
    # Logs are JSON lines (JANUS_LOG_FORMAT=json), as a log collector expects: every tracing
    # line is. Plain lines (the binaries' own stderr messages) are listed as notes.
    for comp in order:
        lines = [l for l in pm.logs(facts[comp]["name"]).splitlines() if l.strip()]
        good, plain = 0, []
        for l in lines:
            try:
                json.loads(l)
                good += 1
            except ValueError:
                plain.append(l)
        ck.check(good > 0 and not [l for l in plain if l.lstrip().startswith("{")],
                 f"{comp}: {good} JSON log lines (JANUS_LOG_FORMAT={facts[comp]['env'].get('JANUS_LOG_FORMAT')})")
        for l in plain:
            ck.note(f"{comp}: log line not in JSON: {l.strip()[:160]}")
    log("stopped")
    print(f"{ck.passed} passed, {len(ck.failed)} failed, {len(ck.notes)} notes")
    return 0 if not ck.failed else 1


if __name__ == "__main__":
    sys.exit(main())

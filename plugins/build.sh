#!/usr/bin/env bash
# Builds every plugin shipped with Gatehouse to a wasm32-wasip2 component and
# copies them to target/plugins/ at the repository root:
#   - the Rust plugins of this workspace (release mode);
#   - tool-policy written in Python (plugins/python/tool-policy), with
#     componentize-py installed into target/tools/componentize-py (a venv);
#   - tool-policy written in JavaScript (plugins/js/tool-policy), with
#     componentize-js installed into target/tools/componentize-js by npm from
#     the pins in plugins/js/package.json and package-lock.json.
# Safe to run on a fresh machine: it installs the Rust target and the Python and
# JavaScript toolchains itself (npm must be on PATH). Set
# GATEHOUSE_SKIP_PYTHON_PLUGINS=1 or GATEHOUSE_SKIP_JS_PLUGINS=1 to skip those.
set -euo pipefail
PLUGINS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$PLUGINS/.." && pwd)"
OUT="$REPO/target/plugins"
COMPONENTIZE_PY_VERSION="0.25.1"
mkdir -p "$OUT"

rustup target add wasm32-wasip2 >/dev/null

echo "building Rust plugins (wasm32-wasip2, release)"
(cd "$PLUGINS" && cargo build --release --target wasm32-wasip2 --quiet)
for wasm in "$PLUGINS"/target/wasm32-wasip2/release/*.wasm; do
    # Copy only if changed, so a running gateway's reload watcher sees real changes only.
    cmp -s "$wasm" "$OUT/$(basename "$wasm")" || cp "$wasm" "$OUT/"
done

if [[ "${GATEHOUSE_SKIP_PYTHON_PLUGINS:-0}" != "1" ]]; then
    venv="$REPO/target/tools/componentize-py"
    if [[ ! -x "$venv/bin/componentize-py" ]] ||
        [[ "$("$venv/bin/componentize-py" --version 2>/dev/null)" != "componentize-py $COMPONENTIZE_PY_VERSION" ]]; then
        echo "installing componentize-py $COMPONENTIZE_PY_VERSION into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
    fi
    src="$PLUGINS/python/tool-policy"
    out="$OUT/tool_policy_py.wasm"
    # componentize-py takes ~20 s: rebuild only when the sources or the WIT changed.
    if [[ ! -f "$out" ]] || [[ -n "$(find "$src" "$REPO/wit" -newer "$out" -name '*.py' -o -newer "$out" -name '*.wit')" ]]; then
        echo "building tool-policy from Python (componentize-py)"
        tmp="$out.tmp"
        "$venv/bin/componentize-py" -d "$REPO/wit" -w plugin componentize app -p "$src" -o "$tmp" >/dev/null
        mv "$tmp" "$out"
    fi
fi

# Rebuilds only when the sources, the WIT or the toolchain pins are newer.
stale() { # stale OUT SOURCE... -> true when OUT is missing or older than a source
    [[ ! -f "$1" ]] || [[ -n "$(find "${@:2}" -newer "$1" -type f -print -quit)" ]]
}

if [[ "${GATEHOUSE_SKIP_JS_PLUGINS:-0}" != "1" ]]; then
    prefix="$REPO/target/tools/componentize-js"
    pins="$(cat "$PLUGINS/js/package.json" "$PLUGINS/js/package-lock.json" | sha256sum | cut -d' ' -f1)"
    if [[ ! -x "$prefix/node_modules/.bin/componentize-js" ]] || [[ "$(cat "$prefix/.pins" 2>/dev/null)" != "$pins" ]]; then
        command -v npm >/dev/null || { echo "npm not found on PATH (needed for the JavaScript plugin)" >&2; exit 1; }
        echo "installing componentize-js into $prefix"
        rm -rf "$prefix"
        mkdir -p "$prefix"
        cp "$PLUGINS/js/package.json" "$PLUGINS/js/package-lock.json" "$prefix/"
        npm ci --prefix "$prefix" --no-audit --no-fund --loglevel=error
        printf '%s\n' "$pins" > "$prefix/.pins"
    fi
    src="$PLUGINS/js/tool-policy"
    out="$OUT/tool_policy_js.wasm"
    # componentize-js takes ~20 s: rebuild only when something it reads changed.
    if stale "$out" "$src" "$REPO/wit" "$prefix/.pins"; then
        echo "building tool-policy from JavaScript (componentize-js)"
        tmp="$out.tmp"
        # No HTTP: a policy plugin gets only the gateway's own imports.
        "$prefix/node_modules/.bin/componentize-js" "$src/app.js" --wit "$REPO/wit" -n plugin \
            -d http fetch-event -o "$tmp" >/dev/null
        mv "$tmp" "$out"
    fi
fi

ls -1 "$OUT"/*.wasm | sed "s|^$REPO/||"

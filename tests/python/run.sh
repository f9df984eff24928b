#!/usr/bin/env bash
# Runs the Python client suite (tests/python) against the real serin binary.
#
#   bash tests/python/run.sh [pytest args...]
#
# Idempotent: creates (once) a venv under ${XDG_CACHE_HOME:-$HOME/.cache}/serin-pytest-venv,
# installs requirements.txt into it quietly, and uses SERIN_BIN (default
# ${CARGO_TARGET_DIR:-target}/debug/serin). It builds nothing unless that binary
# is missing, in which case it runs `cargo build -p serin-control`.
# Exits with pytest's exit code.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

venv="${XDG_CACHE_HOME:-$HOME/.cache}/serin-pytest-venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    echo "== python client suite: creating venv $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if ! "$python" -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        echo "== python3 -m venv failed; installing python3-venv"
        if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo -n"; fi
        export DEBIAN_FRONTEND=noninteractive
        $sudo apt-get update -qq
        $sudo apt-get install -y -qq python3-venv >/dev/null
        "$python" -m venv "$venv"
    fi
fi

# Reinstall only when requirements.txt changed since the last install.
stamp="$venv/.serin-requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "== python client suite: installing requirements"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
    echo "$want" >"$stamp"
fi

target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac
export SERIN_BIN="${SERIN_BIN:-$target_dir/debug/serin}"
case "$SERIN_BIN" in /*) ;; *) SERIN_BIN="$root/$SERIN_BIN" ;; esac
if [ ! -x "$SERIN_BIN" ]; then
    echo "== python client suite: $SERIN_BIN missing; cargo build -p serin-control"
    cargo build -p serin-control
    if [ ! -x "$SERIN_BIN" ]; then
        echo "serin binary still not found at $SERIN_BIN (set SERIN_BIN)" >&2
        exit 2
    fi
fi

echo "== python client suite: $SERIN_BIN"
export PYTHONDONTWRITEBYTECODE=1
set +e
"$venv/bin/python" -m pytest -q tests/python "$@"
code=$?
set -e
exit "$code"

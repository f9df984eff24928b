#!/usr/bin/env bash
# Prints the path of a Python that imports the kmock pinned in
# requirements.txt, creating (once) the venv ${XDG_CACHE_HOME:-$HOME/.cache}/serin-kmock-venv
# and installing the pin into it; reinstalls only when requirements.txt changes.
# Used by control/tests/kmock.rs (and so by `cargo test --workspace`) and by .ci/run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/serin-kmock-venv"
req="$here/requirements.txt"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ "$(cat "$venv/.serin-requirements.sha256" 2>/dev/null || true)" != "$want" ]]; then
  echo "kmock: installing $(grep -m1 kmock "$req") into $venv" >&2
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo -n"; fi
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >&2
  fi
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2
  echo "$want" >"$venv/.serin-requirements.sha256"
fi
echo "$venv/bin/python"

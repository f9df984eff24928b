#!/usr/bin/env bash
# Prints the path of a Python that has the pins of REQUIREMENTS installed:
#
#   bash tests/pinned-venv.sh NAME REQUIREMENTS
#
# creating (once) the venv ${XDG_CACHE_HOME:-$HOME/.cache}/serin-NAME-venv from
# PyPI, installing python3-venv first where it is missing; reinstalls only when
# REQUIREMENTS changes. Everything but the path goes to stderr.
# Used by the suites' own venv.sh (control/tests/kmock, proxy/tests/otlp),
# which their tests and .ci/run call.
set -euo pipefail
name="$1"
req="$2"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/serin-$name-venv"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ "$(cat "$venv/.serin-requirements.sha256" 2>/dev/null || true)" != "$want" ]]; then
  echo "$name: installing $(grep -v '^#' "$req" | tr '\n' ' ')into $venv" >&2
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

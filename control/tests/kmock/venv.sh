#!/usr/bin/env bash
# Prints the path of a Python that imports the kmock pinned in
# requirements.txt, creating (once) the venv ${XDG_CACHE_HOME:-$HOME/.cache}/serin-kmock-venv
# and installing the pin into it; reinstalls only when requirements.txt changes
# (tests/pinned-venv.sh).
# Used by control/tests/kmock.rs (and so by `cargo test --workspace`) and by .ci/run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$here/../../../tests/pinned-venv.sh" kmock "$here/requirements.txt"

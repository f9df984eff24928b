# shellcheck shell=bash disable=SC2034  # sets variables its callers read
# Shared by deploy/image.sh and deploy/image-check.sh (sourced, not run): installing
# missing tools, and reading serin-control's metadata. Each caller defines say and die.

# install_tools TOOL=PACKAGE...: installs (Debian, as root) the packages of the tools
# that are not on PATH, or dies naming them.
install_tools() {
  local pair missing=()
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}")
  done
  [[ ${#missing[@]} -gt 0 ]] || return 0
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing ${missing[*]} (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    die "needs ${missing[*]}: apt-get install -y ${missing[*]}"
  fi
}

# read_crate: sets version, source_url, license and target_dir. From cargo when it is on
# PATH; otherwise (root's PATH under sudo often lacks it) from [workspace.package] in
# Cargo.toml, which serin-control inherits.
read_crate() {
  local meta
  if command -v cargo >/dev/null; then
    meta="$(cargo metadata --locked --no-deps --format-version 1)"
    pkg() { jq -r --arg f "$1" '.packages[] | select(.name == "serin-control") | .[$f] // empty' <<<"$meta"; }
    target_dir="$(jq -r .target_directory <<<"$meta")"
  else
    pkg() { awk -v k="$1" '/^\[/ { in_ws = ($0 == "[workspace.package]") }
      in_ws && $1 == k { sub(/^[^=]*= *"/, ""); sub(/".*/, ""); print; exit }' Cargo.toml; }
    target_dir="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
  fi
  version="$(pkg version)"
  source_url="$(pkg repository)"
  license="$(pkg license)"
}

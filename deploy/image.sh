#!/usr/bin/env bash
# Builds the serin image without a registry or a Docker engine: buildah, FROM scratch.
#
#   deploy/image.sh [--binary PATH] [OUTPUT]
#
# The image is the one deploy/Dockerfile describes, built from parts of this machine instead
# of distroless: the release binary with its debug info stripped (the binary in target/ keeps
# its line tables), exactly the shared libraries it links (ldd) and the dynamic loader,
# /etc/passwd and /etc/group with nonroot = 65532:65532 (as distroless), no shell, and the
# Dockerfile's user, working directory, entrypoint, command, ports and labels. The labels
# (and the same manifest annotations) are the crate's version, the repository and the git
# revision.
#
# OUTPUT (default <target dir>/image/serin-<version>.oci.tar) is an OCI image layout as a
# tar, with gzip layers, that also carries Docker's manifest.json, the layout `docker save`
# writes since Docker 25. So one file loads everywhere: `docker load` (the classic store reads
# manifest.json; the containerd store reads index.json), `podman load`, `kind load
# image-archive` and `minikube image load`, as docker.io/library/serin:<version>, the image
# `serin inject` uses by default. skopeo and umoci read it as `oci-archive:`/OCI layout.
#
# Without --binary it runs `cargo build --locked --release -p serin-control --bin serin`
# (a no-op when target/ is current). Either way the binary must print the crate's version.
# Runs as root on Debian; installs buildah, jq and binutils with apt-get when they are
# missing. The build is deterministic: the timestamps are the commit's (SOURCE_DATE_EPOCH
# overrides), so the same binary gives the same image digest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "deploy/image.sh: $*" >&2; }
die() {
  say "$*"
  exit 1
}

binary=""
out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --binary=*) binary="${1#--binary=}"; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$out" ]] || die "one OUTPUT only"; out="$1"; shift ;;
  esac
done

# --- tools -------------------------------------------------------------------------------
# shellcheck source=deploy/image-lib.sh
source deploy/image-lib.sh
install_tools buildah=buildah jq=jq objcopy=binutils
[[ $(id -u) -eq 0 ]] || die "run as root (buildah with the vfs driver, files owned by root in the image)"

# --- what to build -----------------------------------------------------------------------
command -v cargo >/dev/null || [[ -n "$binary" ]] ||
  die "needs cargo to build serin; or build it yourself and pass --binary"
read_crate
[[ -n "$version" && -n "$source_url" ]] || die "cannot read serin-control's version and repository"

if [[ -z "$binary" ]]; then
  say "cargo build --locked --release -p serin-control --bin serin"
  cargo build --locked --release -p serin-control --bin serin
  binary="$target_dir/release/serin"
fi
[[ -x "$binary" ]] || die "no executable at $binary"
got="$("$binary" --version)" || die "$binary --version failed"
[[ "$got" == "serin $version" ]] ||
  die "$binary says '$got', the crate is $version: a stale binary? Rebuild, or drop --binary"

if revision="$(git rev-parse HEAD 2>/dev/null)"; then
  [[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] || revision="$revision-dirty"
  epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}"
else
  revision="unknown"
  epoch="${SOURCE_DATE_EPOCH:-0}"
fi

name="serin"
tag="$version"
ref="docker.io/library/$name:$tag" # what `serin:<version>` means to Docker, containerd, kind
out="${out:-$target_dir/image/$name-$version.oci.tar}"
arch="$(dpkg --print-architecture 2>/dev/null || uname -m)"
case "$arch" in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; esac

# The same values as deploy/Dockerfile (deploy/image-check.sh compares them).
uid=65532
entrypoint=/usr/local/bin/serin
ports=(8080 9901)
workdir=/home/nonroot
path_env=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# --- build -------------------------------------------------------------------------------
mkdir -p "$(dirname "$out")"
work="$(mktemp -d "$(dirname "$out")/.image-build.XXXXXX")"
export BUILDAH_ISOLATION=chroot
bah=(buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
ctr=""
cleanup() {
  if [[ -n "$ctr" ]]; then "${bah[@]}" rm "$ctr" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

ctr="$("${bah[@]}" from --quiet scratch)"
root="$("${bah[@]}" mount "$ctr")"
chmod 0755 "$root"
install -d -m 0755 "$root/etc" "$root/usr" "$root/usr/local" "$root/usr/local/bin" "$root/home"
install -d -m 1777 "$root/tmp"
install -d -m 0700 -o "$uid" -g "$uid" "$root$workdir"

# The binary, without debug info: symbols stay (panic backtraces name functions).
objcopy --strip-debug "$binary" "$root$entrypoint"
chmod 0755 "$root$entrypoint"

# Exactly the libraries it links, and the loader, each at the path the loader looks up.
libs=()
while read -r line; do
  case "$line" in
    *"=> not found"*) die "$binary needs a library this machine lacks: $line" ;;
    *"=> /"*) libs+=("$(awk '{print $3}' <<<"$line")") ;;
    /*) libs+=("$(awk '{print $1}' <<<"$line")") ;; # the loader
    *) ;;                                            # linux-vdso: in the kernel
  esac
done < <(ldd "$binary")
interp="$(readelf -l "$binary" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')"
[[ " ${libs[*]} " == *" $interp "* ]] || die "ldd did not list the loader $interp"
for lib in "${libs[@]}"; do
  install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done

# Users and name service, as distroless has them. nsswitch.conf: /etc/hosts before DNS.
cat >"$root/etc/passwd" <<EOF
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:$uid:$uid:nonroot:$workdir:/sbin/nologin
EOF
cat >"$root/etc/group" <<EOF
root:x:0:
nobody:x:65534:
nonroot:x:$uid:
EOF
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"
unpacked_bytes="$(du -sb "$root" | awk '{print $1}')"
"${bah[@]}" umount "$ctr" >/dev/null

labels=(
  "org.opencontainers.image.title=$name"
  "org.opencontainers.image.version=$version"
  "org.opencontainers.image.source=$source_url"
  "org.opencontainers.image.revision=$revision"
  "org.opencontainers.image.licenses=$license"
)
config=(
  --user "$uid:$uid"
  --workingdir "$workdir"
  --env "PATH=$path_env"
  --entrypoint "[\"$entrypoint\"]"
  --cmd '["--help"]'
  --os linux --arch "$arch"
  --created-by "deploy/image.sh (buildah, from scratch)"
)
for p in "${ports[@]}"; do config+=(--port "$p/tcp"); done
for l in "${labels[@]}"; do config+=(--label "$l" --annotation "$l"); done
"${bah[@]}" config "${config[@]}" "$ctr"

layout="$work/layout"
"${bah[@]}" commit --quiet --format oci --disable-compression=false --identity-label=false \
  --timestamp "$epoch" "$ctr" "oci:$layout:$tag" >/dev/null

blob() { echo "blobs/${1/://}"; }
# buildah annotates a FROM scratch image with an empty base name and digest: drop them, so
# the manifest carries the labels' annotations only (a new manifest blob, a new digest).
old_digest="$(jq -r '.manifests[0].digest' "$layout/index.json")"
jq -c '.annotations |= with_entries(select(.value != ""))' "$layout/$(blob "$old_digest")" | tr -d '\n' >"$work/manifest"
manifest_digest="sha256:$(sha256sum "$work/manifest" | awk '{print $1}')"
manifest="$layout/$(blob "$manifest_digest")"
rm "$layout/$(blob "$old_digest")"
mv "$work/manifest" "$manifest"
chmod 0644 "$manifest"

# Names for every loader (index.json), and Docker's manifest.json for the classic store.
jq --arg ref "$ref" --arg tag "$tag" --arg digest "$manifest_digest" --argjson size "$(stat -c %s "$manifest")" \
  '.manifests[0] += {digest: $digest, size: $size,
     annotations: {"io.containerd.image.name": $ref, "org.opencontainers.image.ref.name": $tag}}' \
  "$layout/index.json" >"$work/index.json"
mv "$work/index.json" "$layout/index.json"
jq --arg tag "$name:$tag" \
  '[{Config: ("blobs/" + (.config.digest | sub(":"; "/"))), RepoTags: [$tag],
     Layers: [.layers[].digest | "blobs/" + sub(":"; "/")]}]' "$manifest" >"$layout/manifest.json"

tmp_out="$work/out.tar"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" --format=gnu -cf "$tmp_out" -C "$layout" oci-layout index.json manifest.json blobs
mv "$tmp_out" "$out"

layers_bytes="$(jq '[.layers[].size] | add' "$manifest")"
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1000000 }'; }
say "built $ref ($arch, revision $revision)"
say "  archive:  $out ($(mb "$(stat -c %s "$out")"))"
say "  manifest: $manifest_digest"
say "  size:     $(mb "$layers_bytes") compressed (1 layer, gzip), $(mb "$unpacked_bytes") unpacked"
echo "$out"

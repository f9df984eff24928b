#!/usr/bin/env bash
# Builds the serin image with deploy/image.sh, then checks it as Kubernetes will use it, with
# no container runtime: the archive is read with skopeo, unpacked with umoci, and the
# entrypoint is run under chroot the way `serin inject` sets the sidecar up.
#
#   deploy/image-check.sh [ARCHIVE]      # ARCHIVE: check that archive instead of building one
#
# What it asserts, in order:
#   archive     config user 65532:65532, entrypoint, command, working directory, ports; the
#               version/source/revision labels and manifest annotations; one gzip layer of at
#               most 15 MB; the names that docker/podman/kind load (index.json and Docker's
#               manifest.json); deploy/Dockerfile says the same user, entrypoint, ports, labels
#   filesystem  no shell and nothing else: the binary, exactly the libraries it links (the
#               closure of DT_NEEDED, and the loader), passwd/group/nsswitch.conf; nonroot is
#               65532; root owns everything but the home directory; debug info stripped in the
#               image and kept (line tables) in target/release/serin
#   run         as `serin inject`'s sidecar (deploy/examples/app-injected.yaml): user and group
#               65532 with no capabilities and no_new_privs, the root filesystem read-only, the
#               state directory writable; `serin --version` is the crate's; `serin run` proxies
#               to an upstream on loopback; /healthz and /readyz answer; state is saved in the
#               state directory; writes anywhere else fail with EROFS, from serin itself and
#               from a probe in serin's mount namespace
#
# How the read-only root is made (what a runtime does for readOnlyRootFilesystem): in a private
# mount namespace (unshare -m, so nothing leaks to the host and it all goes when serin exits),
# the unpacked rootfs is bind-mounted onto itself, a host directory is bound read-write on the
# state directory, proc and a small /dev are mounted, and the rootfs bind is remounted
# read-only. Then setpriv --no-new-privs --clear-groups and unshare --root/--wd/--setgid/
# --setuid start the entrypoint with the image's working directory as 65532:65532.
# Not reproduced: seccomp, the capability bounding set (the effective and permitted sets are
# empty, as for any non-root process), network and PID namespaces (loopback is the host's).
#
# Needs root, cargo, and Debian packages it installs when missing (buildah, skopeo, umoci, jq,
# binutils, curl, python3). Ports are picked by the kernel (port 0); every wait polls with a
# deadline; everything started is stopped on exit. Exit status 0 only when every check holds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "image-check: $*" >&2; }
die() {
  say "$*"
  exit 1
}
[[ $(id -u) -eq 0 ]] || die "run as root (chroot, mounts, and files owned by other users)"
[[ $# -le 1 ]] || die "usage: deploy/image-check.sh [ARCHIVE]"

# --- tools -------------------------------------------------------------------------------
# shellcheck source=deploy/image-lib.sh
source deploy/image-lib.sh
install_tools buildah=buildah skopeo=skopeo umoci=umoci jq=jq readelf=binutils objcopy=binutils \
  curl=curl python3=python3 nsenter=util-linux setpriv=util-linux
command -v cargo >/dev/null || [[ $# -eq 1 ]] || die "needs cargo to build the image; or pass an ARCHIVE"

read_crate
[[ -n "$version" ]] || die "cannot read serin-control's version"

# --- the archive -------------------------------------------------------------------------
built_here=""
if [[ $# -eq 1 ]]; then
  archive="$1"
  [[ -f "$archive" ]] || die "no archive at $archive"
else
  archive="$(deploy/image.sh)"
  built_here=1
fi

mkdir -p "$target_dir"
work="$(mktemp -d "$target_dir/.image-check.XXXXXX")"
chmod 0711 "$work" # 65532 must reach the rootfs (the probes), as in a runtime's layout
pids=()
exited() { # exited PID: gone, or a zombie waiting for `wait`
  [[ ! -e /proc/$1 ]] || [[ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" == Z ]]
}
stop() { # stop PID: SIGTERM, then SIGKILL after 10 s; returns the exit status
  local pid=$1 code=0 deadline=$((SECONDS + 10))
  kill -TERM "$pid" 2>/dev/null || true
  until exited "$pid"; do
    if ((SECONDS >= deadline)); then kill -KILL "$pid" 2>/dev/null || true; fi
    sleep 0.1
  done
  wait "$pid" 2>/dev/null || code=$?
  return "$code"
}
cleanup() {
  local pid
  for pid in "${pids[@]}"; do stop "$pid" || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

checks=0
failed=()
ok() {
  checks=$((checks + 1))
  echo "  ok    $1"
}
bad() {
  checks=$((checks + 1))
  failed+=("$1")
  echo "  FAIL  $1: $2"
}
# expect NAME GOT WANT
expect() {
  if [[ "$2" == "$3" ]]; then ok "$1"; else bad "$1" "got '$2', want '$3'"; fi
}
# poll DEADLINE_S COMMAND...: runs COMMAND every 0.1 s until it succeeds or the deadline passes
poll() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

# --- archive: skopeo, index.json, manifest.json ------------------------------------------
echo "== archive: $archive"
cfg="$(skopeo inspect --config "oci-archive:$archive")"
manifest="$(skopeo inspect --raw "oci-archive:$archive")"
index="$(tar -xOf "$archive" index.json)"
docker_manifest="$(tar -xOf "$archive" manifest.json 2>/dev/null || echo null)"
c() { jq -c "$@" <<<"$cfg"; }

user="$(c -r .config.User)"
expect "config user is 65532:65532" "$user" "65532:65532"
expect "entrypoint" "$(c .config.Entrypoint)" '["/usr/local/bin/serin"]'
expect "command" "$(c .config.Cmd)" '["--help"]'
expect "exposed ports (serin's defaults, as the Helm chart)" "$(c '.config.ExposedPorts | keys')" '["8080/tcp","9901/tcp"]'
expect "working directory" "$(c -r .config.WorkingDir)" "/home/nonroot"

revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
want_labels="$(jq -cn --arg v "$version" --arg s "$source_url" --arg l "$license" \
  '{"org.opencontainers.image.title": "serin", "org.opencontainers.image.version": $v,
    "org.opencontainers.image.source": $s, "org.opencontainers.image.licenses": $l}')"
check_labels() { # check_labels WHAT JSON
  local what=$1 json=$2 got_rev
  expect "$what: title, version $version, source, licenses" \
    "$(jq -c 'del(.["org.opencontainers.image.revision"]) | to_entries | sort | from_entries' <<<"$json")" \
    "$(jq -c 'to_entries | sort | from_entries' <<<"$want_labels")"
  got_rev="$(jq -r '.["org.opencontainers.image.revision"] // ""' <<<"$json")"
  if [[ "$got_rev" == "$revision" || "$got_rev" == "$revision-dirty" ]]; then
    ok "$what: revision is this checkout's ($got_rev)"
  else
    bad "$what: revision is this checkout's" "got '$got_rev', HEAD is $revision"
  fi
}
check_labels "config labels" "$(c '.config.Labels')"
check_labels "manifest annotations" "$(jq -c .annotations <<<"$manifest")"

layers="$(jq -c '[.layers[].mediaType]' <<<"$manifest")"
compressed="$(jq '[.layers[].size] | add' <<<"$manifest")"
expect "one gzip layer" "$layers" '["application/vnd.oci.image.layer.v1.tar+gzip"]'
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1000000 }'; }
if ((compressed <= 15000000)); then
  ok "compressed size $(mb "$compressed") <= 15 MB"
else
  bad "compressed size <= 15 MB" "$(mb "$compressed")"
fi

ref="docker.io/library/serin:$version"
expect "index.json names the image for containerd/kind/podman" \
  "$(jq -c '[.manifests[] | .annotations["io.containerd.image.name"], .annotations["org.opencontainers.image.ref.name"]]' <<<"$index")" \
  "[\"$ref\",\"$version\"]"
expect "manifest.json names it for docker load (classic store)" \
  "$(jq -c '[.[].RepoTags[]]' <<<"$docker_manifest" 2>/dev/null)" "[\"serin:$version\"]"
if skopeo inspect "docker-archive:$archive" >/dev/null 2>"$work/docker-archive.err"; then
  ok "the archive also reads as a docker-archive (skopeo)"
else
  bad "the archive also reads as a docker-archive" "$(head -c 300 "$work/docker-archive.err")"
fi

# deploy/Dockerfile's final stage must describe the same image.
dockerfile="$(awk '/^FROM /{stage=""} {stage = stage $0 "\n"} END {printf "%s", stage}' deploy/Dockerfile)"
instr() { sed -n "s/^$1 //p" <<<"$dockerfile" | tail -1; }
json_instr() { jq -c . <<<"$(instr "$1")" 2>/dev/null || echo null; }
df_label() { grep -o "org.opencontainers.image.$1=\"[^\"]*\"" <<<"$dockerfile" | sed 's/.*="\(.*\)"/\1/'; }
df_ports="$(instr EXPOSE | tr ' ' '\n' | sed '/^$/d; /\//!s/$/\/tcp/' | sort | jq -Rcs 'split("\n") | map(select(. != ""))')"
df_got="$(jq -cn --arg user "$(instr USER)" --arg wd "$(instr WORKDIR)" --argjson ep "$(json_instr ENTRYPOINT)" \
  --argjson cmd "$(json_instr CMD)" --argjson ports "$df_ports" \
  --arg version "$(sed -n 's/^ARG SERIN_VERSION=//p' <<<"$dockerfile")" \
  --arg title "$(df_label title)" --arg source "$(df_label source)" --arg licenses "$(df_label licenses)" \
  '{$user, $wd, $ep, $cmd, $ports, $version, $title, $source, $licenses}')"
df_want="$(jq -cn --arg user "$user" --arg wd "$(c -r .config.WorkingDir)" --argjson ep "$(c .config.Entrypoint)" \
  --argjson cmd "$(c .config.Cmd)" --argjson ports "$(c '.config.ExposedPorts | keys')" \
  --arg version "$version" --arg title serin --arg source "$source_url" --arg licenses "$license" \
  '{$user, $wd, $ep, $cmd, $ports, $version, $title, $source, $licenses}')"
expect "deploy/Dockerfile describes the same user, workdir, entrypoint, cmd, ports and labels" \
  "$(jq -rn --argjson d "$df_got" --argjson i "$df_want" \
    '[$i | keys[] as $k | select($d[$k] != $i[$k]) | "\($k): Dockerfile \($d[$k] | tojson), image \($i[$k] | tojson)"] | join("; ")')" ""

# --- filesystem: umoci unpack ------------------------------------------------------------
echo "== filesystem"
mkdir "$work/layout"
tar -xf "$archive" -C "$work/layout"
umoci unpack --image "$work/layout:$version" "$work/bundle" >/dev/null
chmod 0711 "$work/bundle"
rootfs="$work/bundle/rootfs"
listing() { (cd "$rootfs" && find . -mindepth 1 "$@" | sed 's|^\./|/|' | sort); }

shells="$(listing \( -name sh -o -name bash -o -name dash -o -name ash -o -name busybox -o -name '*sh' \))"
expect "no shell in the filesystem" "$shells" ""
expect "only regular files and directories (no links, devices)" "$(listing ! -type f ! -type d)" ""

entry="$(c -r '.config.Entrypoint[0]')"
interp="$(readelf -l "$rootfs$entry" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')"
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
# The closure of DT_NEEDED from the entrypoint, each soname found in the image's library dirs.
declare -A libs=()
queue=("$rootfs$entry")
missing_libs=()
while [[ ${#queue[@]} -gt 0 ]]; do
  elf="${queue[0]}"
  queue=("${queue[@]:1}")
  while read -r soname; do
    [[ -n "$soname" ]] || continue
    if [[ "$soname" == "$(basename "$interp")" ]]; then
      path="$interp"
    else
      path=""
      for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib/aarch64-linux-gnu \
        /usr/lib/aarch64-linux-gnu /lib64 /usr/lib64 /lib /usr/lib; do
        if [[ -f "$rootfs$dir/$soname" ]]; then
          path="$dir/$soname"
          break
        fi
      done
    fi
    if [[ -z "$path" ]]; then
      missing_libs+=("$soname")
    elif [[ -z "${libs[$path]:-}" ]]; then
      libs[$path]=1
      queue+=("$rootfs$path")
    fi
  done < <(needed "$elf")
done
libs[$interp]=1
expect "every library serin links is in the image" "${missing_libs[*]:-}" ""
want_files="$(printf '%s\n' "$entry" /etc/passwd /etc/group /etc/nsswitch.conf "${!libs[@]}" | sort)"
got_files="$(listing -type f)"
expect "the files are exactly serin, the libraries it links and the loader, passwd, group, nsswitch.conf" \
  "$got_files" "$want_files"

expect "/etc/passwd: nonroot is 65532:65532 at /home/nonroot" \
  "$(grep '^nonroot:' "$rootfs/etc/passwd" | cut -d: -f1,3,4,6)" "nonroot:65532:65532:/home/nonroot"
expect "/etc/group: nonroot is 65532" "$(grep '^nonroot:' "$rootfs/etc/group" | cut -d: -f1,3)" "nonroot:65532"
expect "root owns everything but /home/nonroot" "$(listing ! -user 0 -o ! -group 0)" "/home/nonroot"
expect "nothing group- or world-writable but /tmp (sticky)" "$(listing -perm /022 ! -path ./tmp)" ""

debug_sections() { readelf -S -W "$1" | grep -oE '\.debug_(info|line|str|abbrev|ranges|loc)\b' | sort -u | tr '\n' ' '; }
expect "no debug info in the image's serin" "$(debug_sections "$rootfs$entry")" ""
if [[ -n "$built_here" ]]; then
  if debug_sections "$target_dir/release/serin" | grep -q debug_line; then
    ok "target/release/serin keeps its line tables"
  else
    bad "target/release/serin keeps its line tables" "no .debug_line in $target_dir/release/serin"
  fi
fi
unpacked="$(du -sb "$rootfs" | awk '{print $1}')"

# --- run: chroot as the sidecar ----------------------------------------------------------
echo "== run"
# The sidecar as `serin inject` writes it (deploy/examples/app-injected.yaml, kept current by
# the inject tests): its state directory, user and group.
injected=deploy/examples/app-injected.yaml
state_dir="$(awk 'prev == "- --state-dir" {print $2; exit} {prev = $1 " " $2}' "$injected")"
run_uid="$(sed -n 's/^ *runAsUser: //p' "$injected" | sort -u)"
run_gid="$(sed -n 's/^ *runAsGroup: //p' "$injected" | sort -u)"
ro_root="$(grep -o 'readOnlyRootFilesystem: true' "$injected" | sort -u)"
expect "serin inject runs the sidecar as the image's user, with a read-only root" \
  "$run_uid:$run_gid $ro_root" "$user readOnlyRootFilesystem: true"
[[ "$state_dir" == /* ]] || die "cannot read the sidecar's --state-dir from $injected"
workdir="$(c -r .config.WorkingDir)"
mapfile -t image_env < <(c -r '.config.Env[]')

# Mountpoints, as a runtime creates them in the container's root before making it read-only.
mkdir -p "$rootfs/proc" "$rootfs/dev" "$rootfs$state_dir"
state_host="$work/state" # the emptyDir
install -d -m 0755 -o "$run_uid" -g "$run_gid" "$state_host"
cat >"$work/launch" <<'EOF'
#!/usr/bin/env bash
# launch ROOTFS STATE_HOST STATE_DIR WORKDIR UID GID [VAR=VALUE...] -- ARGV...
# Runs in a private mount namespace (unshare -m): the mounts die with the process.
set -euo pipefail
r=$1 state_host=$2 state_dir=$3 wd=$4 uid=$5 gid=$6
shift 6
env=()
while [[ $1 != -- ]]; do env+=("$1"); shift; done
shift
mount --bind "$r" "$r"
mount --bind "$state_host" "$r$state_dir"
mount -t proc -o nosuid,nodev,noexec proc "$r/proc"
mount -t tmpfs -o nosuid,noexec,mode=0755,size=64k tmpfs "$r/dev"
for d in null zero full random urandom; do
  touch "$r/dev/$d"
  mount --bind "/dev/$d" "$r/dev/$d"
done
mount -o remount,bind,ro,nosuid,nodev "$r"
exec env -i "${env[@]}" "$(command -v setpriv)" --no-new-privs --clear-groups -- \
  "$(command -v unshare)" --root="$r" --wd="$wd" --setgid="$gid" --setuid="$uid" -- "$@"
EOF
chmod 0755 "$work/launch"
# in_image [VAR=VALUE...] -- ARGV...: the image's entrypoint and env, as 65532, read-only root
launcher=(unshare --mount --propagation private -- "$work/launch" "$rootfs" "$state_host" "$state_dir"
  "$workdir" "$run_uid" "$run_gid" "${image_env[@]}" "HOME=$workdir")
in_image() { "${launcher[@]}" "$@"; }

expect "serin --version in the image is the crate's" "$(in_image -- "$entry" --version 2>&1)" "serin $version"

# The upstream: python's http.server on a kernel-chosen loopback port.
mkdir "$work/www"
marker="hello from the upstream $RANDOM$RANDOM"
echo "$marker" >"$work/www/hello"
python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$work/www" >"$work/upstream.out" 2>&1 &
pids+=($!)
upstream_port() { sed -n 's/^Serving HTTP on 127.0.0.1 port \([0-9]*\).*/\1/p' "$work/upstream.out"; }
upstream_started() { [[ -n "$(upstream_port)" ]]; }
poll 10 upstream_started || die "the upstream did not start: $(cat "$work/upstream.out")"
upstream="http://127.0.0.1:$(upstream_port)"

# serin run, with the sidecar's arguments but loopback and kernel-chosen ports.
token="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
start_serin() { # start_serin NAME STATE_DIR: background serin run; sets serin_pid
  # exec: the background job's PID is serin's (unshare, launch, env, setpriv, unshare all exec)
  (exec "${launcher[@]}" "SERIN_ADMIN_TOKEN=$token" -- "$entry" run --listen 127.0.0.1:0 \
    --stable "$upstream" --canary "$upstream" --admin 127.0.0.1:0 --state-dir "$2" \
    >"$work/$1.out" 2>"$work/$1.err") &
  serin_pid=$!
  pids+=("$serin_pid")
}
listening() { grep -q 'proxy listening on' "$work/$1.out" && grep -q 'control API listening on' "$work/$1.out"; }
alive_and_listening() { ! exited "$serin_pid" || return 0; listening "$1"; }

start_serin serin "$state_dir"
poll 10 alive_and_listening serin || true
if ! listening serin; then
  die "serin run did not start in the image: $(cat "$work/serin.out" "$work/serin.err" | tail -20)"
fi
ok "serin run starts in the image"
proxy="http://$(sed -n 's/.*proxy listening on \([0-9.:]*\).*/\1/p' "$work/serin.out")"
admin="http://$(sed -n 's/.*control API listening on \([0-9.:]*\).*/\1/p' "$work/serin.out")"

status="$(grep -E '^(Uid|Gid|Groups|CapPrm|CapEff|NoNewPrivs):' "/proc/$serin_pid/status" | tr -s '\t ' ' ' | sed 's/ $//' | tr '\n' ';')"
expect "serin runs as 65532:65532, no groups, no capabilities, no_new_privs" "$status" \
  "Uid: 65532 65532 65532 65532;Gid: 65532 65532 65532 65532;Groups:;CapPrm: 0000000000000000;CapEff: 0000000000000000;NoNewPrivs: 1;"
expect "serin's root is the unpacked image, its cwd the working directory" \
  "$(readlink "/proc/$serin_pid/root") $(readlink "/proc/$serin_pid/cwd")" "$rootfs $rootfs$workdir"

http() { # http METHOD URL [CURL ARGS...]: prints "STATUS BODY"
  local method=$1 url=$2
  shift 2
  curl -sS --max-time 5 -o "$work/body" -w '%{http_code}' -X "$method" "$@" "$url" || true
  printf ' %s' "$(cat "$work/body" 2>/dev/null)"
}
expect "GET /healthz" "$(http GET "$admin/healthz")" '200 {"status":"ok"}'
expect "GET /readyz" "$(http GET "$admin/readyz")" '200 {"status":"ready"}'
expect "serin proxies a request to the upstream on loopback" "$(http GET "$proxy/hello")" "200 $marker"

state_json="$state_host/state.json"
if poll 10 test -s "$state_json"; then
  expect "state saved in the state directory, owned by 65532" "$(stat -c %u:%g "$state_json")" "$run_uid:$run_gid"
else
  bad "state saved in the state directory" "no $state_json after 10 s"
fi
expect "PUT /weight without the token is refused" \
  "$(http PUT "$admin/weight" -H 'content-type: application/json' -d '{"canary":0}' | cut -d' ' -f1)" 401
expect "PUT /weight with the token (SERIN_ADMIN_TOKEN) is accepted" \
  "$(http PUT "$admin/weight" -H "authorization: Bearer $token" -H 'content-type: application/json' -d '{"canary":0}' | cut -d' ' -f1)" 200
if poll 10 grep -q '"phase": "manual"' "$state_json"; then
  ok "the change is saved in the state directory"
else
  bad "the change is saved in the state directory" "$(head -c 200 "$state_json")"
fi

# Writes outside the state directory, from a probe in serin's own mount namespace (the same
# mounts serin sees; host tools, since the image has none). As 65532, /tmp and /home/nonroot
# are writable by permission, so only the read-only mount stops them; as root, nothing but the
# mount stops any write.
probe() { # probe UID PATH: "ok" or the error
  # shellcheck disable=SC2016 # $1 is the inner shell's
  nsenter --target "$serin_pid" --mount --setuid "$1" --setgid "$1" -- \
    sh -c ': >>"$1" && echo ok' probe "$rootfs$2" 2>&1 | sed 's/.*: //'
}
for p in /tmp/probe /home/nonroot/probe; do
  expect "as 65532, writing $p fails: read-only file system" "$(probe "$run_uid" "$p")" "Read-only file system"
done
for p in /probe /etc/passwd "$(dirname "$entry")/probe"; do
  expect "as root, writing $p fails: read-only file system" "$(probe 0 "$p")" "Read-only file system"
done
expect "as 65532, writing in the state directory works" "$(probe "$run_uid" "$state_dir/probe")" "ok"
rm -f "$state_host/probe"

# serin itself, given a state directory outside the volume, cannot save its state.
start_serin outside "$workdir/serin-state"
saved_error() { grep -q 'could not save state' "$work/outside.err"; }
if poll 10 saved_error; then
  expect "serin's own write outside the state directory fails: read-only file system" \
    "$(grep -o 'Read-only file system' "$work/outside.err" | head -1)" "Read-only file system"
else
  bad "serin's own write outside the state directory fails" "no error logged: $(tail -3 "$work/outside.err")"
fi
stop "$serin_pid" || true
pids=("${pids[@]:0:2}")
expect "nothing was written in the image" "$(listing -newer "$rootfs/etc/passwd" -type f)" ""

# A clean stop: SIGTERM drains and exits 0.
code=0
stop "${pids[1]}" || code=$?
pids=("${pids[0]}")
expect "serin stops on SIGTERM with status 0" "$code" 0
expect "no mount leaked to the host" "$(grep -c " $work" /proc/self/mountinfo || true)" 0

# --- summary -----------------------------------------------------------------------------
digest="$(jq -r '.manifests[0].digest' <<<"$index")"
if [[ ${#failed[@]} -eq 0 ]]; then
  say "serin:$version (${digest:0:19}) holds all $checks checks: $(mb "$compressed") compressed, $(mb "$unpacked") unpacked, no shell, runs as $user on a read-only root with $state_dir writable, proxies and answers its probes"
else
  say "serin:$version FAILED ${#failed[@]} of $checks checks: $(printf '%s; ' "${failed[@]}")"
  exit 1
fi

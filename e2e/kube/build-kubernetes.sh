#!/usr/bin/env bash
# Builds Kubernetes' server binaries (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubelet, kube-proxy) and kubectl from Debian bookworm's `kubernetes` source package with
# Debian's Go, into a cache directory keyed on the source package version. Reused when present.
#
#   e2e/kube/build-kubernetes.sh            # prints the directory holding bin/ and pause.c
#
# Environment: STACKROUTE_KUBE_CACHE (default /var/cache/stackroute-kube).
# Needs root (apt-get) the first time; about 5 minutes on 2 cores, 3 GB of scratch disk,
# about 435 MB kept. Progress goes to stderr, the result directory to stdout.
set -Eeuo pipefail

CACHE=${STACKROUTE_KUBE_CACHE:-/var/cache/stackroute-kube}
COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

log() { printf 'build-kubernetes: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# No silent exit under set -e: say which command failed.
trap 'log "error: line $LINENO: $BASH_COMMAND failed"' ERR

# Debian's deb-src entries for bookworm and their index, private to this script's apt calls:
# the host's apt configuration and package lists are left as they are.
SOURCES_LIST=$CACHE/deb-src.list
APT_SRC=(-o "Dir::Etc::SourceList=$SOURCES_LIST" -o "Dir::Etc::SourceParts=-"
  -o "Dir::State::Lists=$CACHE/apt-lists" -o APT::Sandbox::User=root)

mkdir -p "$CACHE/apt-lists/partial"
cat > "$SOURCES_LIST" <<'EOF'
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
EOF

# The newest source version in the private index; empty before its first update.
version() { { apt-cache "${APT_SRC[@]}" showsrc kubernetes 2>/dev/null || true; } | sed -n 's/^Version: //p' | sort -V | tail -1; }

VERSION=$(version)
if [ -z "$VERSION" ]; then
  [ "$(id -u)" = 0 ] || die "no source index for 'kubernetes' and not root: run as root once (apt-get update of deb-src)"
  log "fetching the deb-src index for bookworm"
  apt-get "${APT_SRC[@]}" update -qq >&2 || die "apt-get update of the deb-src index failed"
  VERSION=$(version)
  [ -n "$VERSION" ] || die "Debian has no source package 'kubernetes' for bookworm"
fi
OUT=$CACHE/kubernetes-$VERSION
complete() { for c in "${COMMANDS[@]}"; do [ -x "$OUT/bin/$c" ] || return 1; done; [ -f "$OUT/pause.c" ]; }
if complete; then
  log "cached: $OUT (source package $VERSION)"
  echo "$OUT"
  exit 0
fi

# Build prerequisites.
PACKAGES=(golang-go rsync make golang-github-modern-go-reflect2-dev dpkg-dev)
missing=()
for p in "${PACKAGES[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]} (apt-get install them as root)"
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

WORK=$CACHE/build
rm -rf "$WORK" && mkdir -p "$WORK"
start=$SECONDS
log "downloading the source package kubernetes=$VERSION"
(cd "$WORK" && apt-get "${APT_SRC[@]}" source --download-only -qq "kubernetes=$VERSION" >&2) \
  || die "downloading the source package failed (a stale index? rm -r $CACHE/apt-lists and retry)"
orig=$(ls "$WORK"/kubernetes_*.orig.tar.gz 2>/dev/null | head -1)
[ -n "$orig" ] || die "the source package has no .orig.tar.gz"
tar -xzf "$orig" -C "$WORK"
tree=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
[ -n "$tree" ] && [ -d "$tree/vendor" ] || die "unexpected source layout in $orig"

# The vendored github.com/modern-go/reflect2 1.0.1 crashes under Go >= 1.18 ("fatal error:
# fault" in map iteration); Debian's 1.0.2 has the same API and works.
reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -d "$reflect2" ] || die "$reflect2 missing (golang-github-modern-go-reflect2-dev)"
rm -rf "$tree/vendor/github.com/modern-go/reflect2"
mkdir -p "$tree/vendor/github.com/modern-go/reflect2"
cp "$reflect2"/*.go "$reflect2"/*.s "$tree/vendor/github.com/modern-go/reflect2/"
sed -i 's#github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 v1.0.2#g' \
  "$tree/go.mod" "$tree/vendor/modules.txt"

log "building ${COMMANDS[*]} with $(go version | cut -d' ' -f3) (about 5 minutes on 2 cores)"
targets=$(printf 'cmd/%s ' "${COMMANDS[@]}")
(cd "$tree" && env GOPATH="$tree/.go" GOFLAGS=-mod=vendor GOPROXY=off CGO_ENABLED=0 HOME="$WORK/home" \
  make WHAT="$targets" >"$WORK/make.log" 2>&1) || { tail -30 "$WORK/make.log" >&2; die "make failed (log: $WORK/make.log)"; }

rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp/bin"
for c in "${COMMANDS[@]}"; do cp "$tree/_output/local/bin/linux/amd64/$c" "$OUT.tmp/bin/"; done
cp "$tree/build/pause/linux/pause.c" "$OUT.tmp/pause.c"
echo "$VERSION" > "$OUT.tmp/SOURCE-VERSION"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
rm -rf "$WORK"
log "built in $((SECONDS - start)) s: $OUT"
echo "$OUT"

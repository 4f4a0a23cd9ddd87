#!/bin/bash
# Latency of `loader set add` beside and into a 1M-prefix host-route-heavy set (release build).
# Run as root from the repository: docs/bench/set-latency.sh (makes /tmp/setbench, a netns
# "xsetb" with a veth pair; removes the netns at the end).
set -e
here=$(cd "$(dirname "$0")" && pwd)
L=${L:-$here/../../target/release/loader}
mkdir -p /tmp/setbench && cd /tmp/setbench
[ -f big.txt ] || python3 "$here/set-latency-gen.py"
ip netns add xsetb
trap 'ip netns del xsetb' EXIT
ip -n xsetb link add vsb0 type veth peer name vsb1
ip -n xsetb link set vsb0 up && ip -n xsetb link set vsb1 up
export XDPFW_HISTORY_ROOT=/tmp/setbench/hist
rm -rf hist; : > f2b.txt
/usr/bin/time -f "attach: %e s" $L --netns xsetb attach vsb0 --rules rules.toml
run() { echo "== $*"; /usr/bin/time -f "wall %e s, max rss %M KiB" $L --netns xsetb "$@"; }
run set add vsb0 f2b 198.18.0.1
run set add vsb0 f2b 198.18.0.1
run set add vsb0 f2b --file batch10k.txt
run set add vsb0 big 198.18.0.2
run set add vsb0 big --file batch10k.txt
run set del vsb0 f2b 198.18.0.1
run reload rules.toml --iface vsb0
# Again: a new process beside the same set files (their parsed prefixes kept on disk).
run reload rules.toml --iface vsb0
$L --netns xsetb detach vsb0

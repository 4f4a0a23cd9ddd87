#!/bin/bash
# Latency of `loader set add` beside/into a 1M-prefix host-route-heavy set (release build).
set -e
cd /tmp/setbench
L=${L:-/work/wt-sets/target/release/loader}
export XDPFW_HISTORY_ROOT=/tmp/setbench/hist
$L --netns xsetb detach vsb0 2>/dev/null || true
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

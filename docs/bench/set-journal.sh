#!/bin/bash
# How `loader set add` of one address scales with the set journal's size (release build): a
# set grown by batches of random host routes to 0, 10k, 50k and 100k journal entries, then five
# single adds at each size; prints the reload phases of each (`--json`) and the wall time.
# Run as root from the repository: docs/bench/set-journal.sh (makes /tmp/setjournal, a netns
# "xsetj" with a veth pair; removes the netns at the end).
set -e
here=$(cd "$(dirname "$0")" && pwd)
L=${L:-$here/../../target/release/loader}
mkdir -p /tmp/setjournal && cd /tmp/setjournal
ip netns add xsetj
trap 'ip netns del xsetj' EXIT
ip -n xsetj link add vsj0 type veth peer name vsj1
ip -n xsetj link set vsj0 up && ip -n xsetj link set vsj1 up
export XDPFW_HISTORY_ROOT=/tmp/setjournal/hist
rm -rf hist; : > bans.txt
printf 'default = "pass"\n[sets.bans]\nfile = "bans.txt"\n[[rule]]\nname = "bans"\naction = "drop"\nsrc = ["@bans"]\n' > rules.toml
$L --netns xsetj attach vsj0 --rules rules.toml >/dev/null
have=0
for size in 0 10000 50000 100000; do
  if [ $size -gt $have ]; then
    python3 -c "import random; random.seed($size); print('\n'.join('%d.%d.%d.%d' % (random.randint(1,223), random.randint(0,255), random.randint(0,255), random.randint(0,255)) for _ in range($size - $have)))" > grow.txt
    $L --netns xsetj set add vsj0 bans --file grow.txt >/dev/null
    have=$size
  fi
  for i in 1 2 3 4 5; do
    a="198.18.$((size / 1000 % 256)).$i"
    start=$(date +%s%N)
    out=$($L --netns xsetj set add vsj0 bans $a --json)
    end=$(date +%s%N)
    echo "$out" | python3 -c "import json,sys; r=json.load(sys.stdin); t=r['reload']['times']; print('journal %6d: path %-6s to flip %6.1f ms, total %6.1f ms, wall %6.1f ms (parse %.1f, compile %.1f, install %.1f)' % ($size, r['path'], t['to_flip_us']/1000, t['total_us']/1000, ($end-$start)/1e6, t['parse_us']/1000, t['compile_us']/1000, (t['install_arrays_us']+t['install_tables_us'])/1000))"
  done
done
echo "snapshots kept: $(ls hist/*/vsj0/snapshots 2>/dev/null | grep -vc blobs)"
du -sh hist
$L --netns xsetj detach vsj0 >/dev/null

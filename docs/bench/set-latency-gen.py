# The inputs of set-latency.sh: a deterministic 1M-prefix host-route-heavy IPv4 set (10% /16-/23,
# 45% /24, 45% /32), a 10,000-address batch, and a three-rule ruleset over them.
import random
r = random.Random(11)
seen, lines = set(), []
while len(lines) < 1_000_000:
    x, a = r.random(), r.getrandbits(32)
    l = r.randint(16, 23) if x < 0.10 else 24 if x < 0.55 else 32
    a &= (0xffffffff << (32 - l)) & 0xffffffff
    if (a >> 24) in (0, 127, 192, 198, 203, 10, 224, 225, 240, 255) or (a, l) in seen:
        continue
    seen.add((a, l))
    lines.append("%d.%d.%d.%d/%d" % (a >> 24, (a >> 16) & 255, (a >> 8) & 255, a & 255, l))
open("big.txt", "w").write("\n".join(lines) + "\n")
open("batch10k.txt", "w").write("\n".join("100.%d.%d.%d" % (64 + (i >> 16) % 64, (i >> 8) & 255, i & 255) for i in range(10000)) + "\n")
open("f2b.txt", "w").write("")
open("rules.toml", "w").write('''default = "pass"
[sets.big]
file = "big.txt"
[sets.f2b]
file = "f2b.txt"
[[rule]]
name = "f2b"
action = "drop"
src = ["@f2b"]
[[rule]]
name = "big"
action = "drop"
src = ["@big"]
[[rule]]
name = "ssh"
action = "pass"
proto = "tcp"
dport = 22
''')

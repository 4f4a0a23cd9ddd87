# Everything issue 13 put on the packet's path compiled out: tracing and logging (notrace.py),
# the limit/state/vlan path of `classify`, and the ND option (neighbour discovery always passes).
exec(open(__file__.replace('nopolicy.py', 'notrace.py')).read())
p = 'xdp-ebpf/src/main.rs'
s = open(p).read()
a = s.index('    if header.flags & POLICY != 0 || header.fields & field::VLAN != 0 {')
b = s.index('    if header.fields == 0 {', a)
s = s[:a] + s[b:]
old = '    if pkt.neighbor_discovery && header.flags & header_flags::ND_RULES == 0 {'
assert old in s
s = s.replace(old, '    if pkt.neighbor_discovery {')
open(p, 'w').write(s)

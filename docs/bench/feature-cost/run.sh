#!/usr/bin/env bash
# One paired comparison of the variants built by build.sh against this build, as root:
#
#   docs/bench/feature-cost/run.sh OUT_DIR
#
# Prints each baseline's line: "trace off is Rx the baseline (… paired median Px …)": P above 1
# means this build is slower than the baseline by that factor. The bench runs this build as
# the plain copy (`variant::PLAIN`, what serves rulesets without limits, state, VLAN, log):
# this.o@plain is the same program, so its figure is the noise; this.o is the full copy;
# nopolicy.o the program without issue 13. Run it several times on a quiet machine.
set -euo pipefail
out=$(cd "${1:?usage: run.sh OUT_DIR}" && pwd)
cd "$(dirname "$0")/../../.."
XDPFW_BENCH_REPEAT=${XDPFW_BENCH_REPEAT:-20000} XDPFW_BENCH_ROUNDS=${XDPFW_BENCH_ROUNDS:-8} \
    XDPFW_BENCH_BASELINE="$out/this.o@plain,$out/this.o,$out/notrace.o,$out/nopolicy.o" \
    cargo bench -p xdpfw-tests --bench classifier -- --trace 2>&1 | grep -E '^(verifier|baseline [^ ]+:|trace off:)'

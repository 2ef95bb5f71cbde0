#!/usr/bin/env bash
# User-space instructions per round trip of an echo server, counted by valgrind's callgrind:
# unlike CPU time, the count does not move with the machine's load, so a before/after of the
# per-read path can be read to a percent. The kernel's share (system calls) is not counted.
#
#   N=10000 benchmarks/instructions.sh tcp_server.py --engine threads
#   N=30000 benchmarks/instructions.sh ../before/tcp_server.py --engine asyncio --loop uvloop
#
# Run it at two N and take the difference over the extra round trips: that leaves out the
# fixed cost of opening and closing the connections. Prints one line: Ir/rt and the totals.
# Needs valgrind and the venv (scripts/test makes it). SIZE, C and P set the message size, the
# number of connections and the messages in flight on each (default 64 B, 50, 1).
set -euo pipefail
cd "$(dirname "$0")/.."
script=$1
shift
N=${N:-20000}
SIZE=${SIZE:-64}
C=${C:-50}
P=${P:-1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" \
    .venv/bin/python "$script" --host 127.0.0.1 --port 0 -q "$@" >"$work/server.log" 2>/dev/null &
server=$!
for _ in $(seq 300); do grep -q "[0-9]$" "$work/server.log" 2>/dev/null && break; sleep 0.2; done
port=$(head -1 "$work/server.log" | grep -o '[0-9]*$')
# A warm-up outside the count, then the counted run.
.venv/bin/tcpecho bench "127.0.0.1:$port" -c "$C" -s "$SIZE" -n 2000 --warmup 0 --timeout 60 >/dev/null
callgrind_control -i on "$server" >/dev/null
.venv/bin/tcpecho bench "127.0.0.1:$port" -c "$C" -s "$SIZE" -p "$P" -n "$N" --warmup 0 --timeout 60 \
    --json >"$work/bench.json"
callgrind_control -i off "$server" >/dev/null
kill -INT "$server"
wait "$server" || true
rt=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['round_trips'])" "$work/bench.json")
# awk reads to the end: grep -m1 would close the pipe early, and pipefail would end the script.
ir=$(callgrind_annotate "$work/cg.out" | awk '/PROGRAM TOTALS/ && !n++ {gsub(",", "", $1); print $1}')
echo "$script $* size=$SIZE connections=$C pipeline=$P round_trips=$rt Ir=$ir Ir/rt=$((ir / rt))"

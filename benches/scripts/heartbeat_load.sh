#!/usr/bin/env bash
# Heartbeats against one coordinator: 50,000 simulated hosts (bar: >= 10,000 heartbeats/s
# sustained with p99 < 50 ms, every report durable before it is answered).
#
#   benches/scripts/heartbeat_load.sh                       # builds, then 1 run
#   RUNS=5 benches/scripts/heartbeat_load.sh
#   HOSTS=50000 RATE=10000 DURATION=30 CONNECTIONS=32 NO_BUILD=1 benches/scripts/heartbeat_load.sh
#   COORDINATOR_BIN=/path/to/fleetwave-coordinator NO_BUILD=1 benches/scripts/heartbeat_load.sh
#
# Each run starts `fleetwave-coordinator` on a fresh data directory under WORK_PARENT (default
# /var/tmp) on 127.0.0.1 ephemeral ports, runs `heartbeat_load` against it (enroll every host,
# then RATE heartbeats/s for DURATION s, open loop), stops the coordinator with SIGTERM by its
# PID, and has `heartbeat_load --verify` open the stopped coordinator's store to check that every
# acknowledged report is in it. Extra arguments go to `heartbeat_load`. Each step runs under
# `timeout`; the data directory is deleted on exit.
set -euo pipefail

RUNS=${RUNS:-1}
HOSTS=${HOSTS:-50000}
RATE=${RATE:-10000}
DURATION=${DURATION:-30}
CONNECTIONS=${CONNECTIONS:-32}
WORK_PARENT=${WORK_PARENT:-/var/tmp}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
log() { printf '%s\n' "$*" >&2; }

if [ -z "${NO_BUILD:-}" ]; then
    log "building the release binaries"
    (cd "$ROOT" && cargo build --release --quiet -p fleetwave -p fleetwave-coordinator &&
        cargo build --release --quiet -p fleetwave-benches --bin heartbeat_load)
fi
BIN=$ROOT/target/release

WORK=$(mktemp -d "$WORK_PARENT/fleetwave-heartbeat-load.XXXXXX")
COORD_PID=
cleanup() {
    if [ -n "$COORD_PID" ] && kill -0 "$COORD_PID" 2>/dev/null; then
        kill -TERM "$COORD_PID" 2>/dev/null || true
        wait "$COORD_PID" 2>/dev/null || true
    fi
    rm -rf -- "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$BIN/fleetwave" keygen --out "$WORK/release.key" >/dev/null
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/join.token"

echo "heartbeat_load: $HOSTS hosts, $RATE heartbeats/s for $DURATION s, $CONNECTIONS connections;" \
    "$(nproc) cores, data on $(stat -f -c %T "$WORK_PARENT") ($WORK_PARENT)"
for run in $(seq 1 "$RUNS"); do
    DATA="$WORK/coordinator-$run"
    mkdir -p "$DATA"
    FLEETWAVE_LOG=${FLEETWAVE_LOG:-warn} "${COORDINATOR_BIN:-$BIN/fleetwave-coordinator}" --data-dir "$DATA" \
        --listen-grpc 127.0.0.1:0 --listen-api 127.0.0.1:0 \
        --trust "$WORK/release.key.pub" --join-token-file "$WORK/join.token" \
        --heartbeat-interval 5s --lost-after 60s 2>"$WORK/coordinator-$run.log" &
    COORD_PID=$!
    for _ in $(seq 1 300); do
        [ -s "$DATA/ready.json" ] && break
        kill -0 "$COORD_PID" 2>/dev/null || { cat "$WORK/coordinator-$run.log" >&2; exit 1; }
        sleep 0.1
    done
    GRPC=$(sed -n 's/.*"grpc": *"\([^"]*\)".*/\1/p' "$DATA/ready.json")
    [ -n "$GRPC" ] || { log "the coordinator did not write ready.json"; exit 1; }

    echo
    echo "== run $run (coordinator pid $COORD_PID, gRPC $GRPC)"
    timeout "$STEP_TIMEOUT" "$BIN/heartbeat_load" --grpc "$GRPC" \
        --join-token-file "$WORK/join.token" --pid "$COORD_PID" --hosts "$HOSTS" --rate "$RATE" \
        --duration "$DURATION" --connections "$CONNECTIONS" --acked "$WORK/acked-$run.txt" "$@"
    echo "coordinator data dir: $(du -sh "$DATA" | cut -f1)"

    kill -TERM "$COORD_PID"
    timeout 30 tail --pid="$COORD_PID" -f /dev/null || { log "coordinator did not stop"; exit 1; }
    wait "$COORD_PID" 2>/dev/null || true
    COORD_PID=
    timeout "$STEP_TIMEOUT" "$BIN/heartbeat_load" --verify "$DATA/state" --acked "$WORK/acked-$run.txt"
    rm -rf -- "$DATA"
done

#!/usr/bin/env bash
# Peak resident memory of `fleetwave publish` on a large generated input (bar: <= 256 MiB at 4 GiB).
#
#   benches/scripts/publish_rss.sh                  # 4 GiB input
#   SIZE_MIB=8192 benches/scripts/publish_rss.sh
#   FLEETWAVE_BIN=/path/to/fleetwave benches/scripts/publish_rss.sh   # no build
#
# Generates SIZE_MIB of pseudo-random data under WORK_PARENT (default /var/tmp), publishes it
# once to an empty origin next to it under GNU time's `-v` and once more (as a new version) to
# the same origin, now holding every chunk, then prints the maximum RSS and wall time of each.
# The input and the origin (about 2 x SIZE_MIB) are deleted on exit; each publish runs under
# `timeout STEP_TIMEOUT` (default 900 s).
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-4096}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
WORK_PARENT=${WORK_PARENT:-/var/tmp}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
log() { printf '%s\n' "$*" >&2; }

if [ ! -x /usr/bin/time ]; then
    log "installing GNU time"
    apt-get install -y -q time >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q time >/dev/null 2>&1; } ||
        { log "GNU time (/usr/bin/time) is required: apt-get install time"; exit 1; }
fi
if [ -z "${FLEETWAVE_BIN:-}" ]; then
    log "building the release binary"
    (cd "$ROOT" && cargo build --release --quiet --bin fleetwave)
fi
BIN=$(realpath "${FLEETWAVE_BIN:-$ROOT/target/release/fleetwave}")

need_kib=$((SIZE_MIB * 1024 * 2 + 1024 * 1024))
free_kib=$(df -Pk "$WORK_PARENT" | awk 'NR == 2 { print $4 }')
if [ "$free_kib" -lt "$need_kib" ]; then
    log "need $((need_kib / 1024 / 1024)) GiB free in $WORK_PARENT, have $((free_kib / 1024 / 1024)) GiB"
    exit 1
fi

WORK=$(mktemp -d "$WORK_PARENT/fleetwave-publish-rss.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT
trap 'exit 130' INT TERM

INPUT="$WORK/input.bin"
log "generating $SIZE_MIB MiB of pseudo-random data in $INPUT"
openssl rand -out "$INPUT" $((SIZE_MIB * 1024 * 1024)) 2>/dev/null ||
    head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom >"$INPUT"
"$BIN" keygen --out "$WORK/key" >/dev/null

# measure LABEL VERSION: one publish under GNU time; prints a table row.
measure() {
    local label=$1 version=$2 stats="$WORK/time-$2.txt"
    sync
    timeout "$STEP_TIMEOUT" /usr/bin/time -v -o "$stats" "$BIN" publish "$INPUT" \
        --service rss --version "$version" --key "$WORK/key" --origin "$WORK/origin" -q >&2
    awk -v label="$label" -F': ' '
        /Maximum resident set size/ { rss = $2 }
        /Elapsed \(wall clock\)/ { wall = $2 }
        END { printf "| %-38s | %8.1f MiB | %10s |\n", label, rss / 1024, wall }' "$stats"
}

echo "fleetwave publish of $SIZE_MIB MiB of pseudo-random data, $(nproc) cores," \
    "origin on $(stat -f -c %T "$WORK")"
echo
echo "| case                                   |   peak RSS   | wall (m:s) |"
echo "|----------------------------------------|-------------:|-----------:|"
measure "first publish (every chunk new)" v1
measure "second version (every chunk present)" v2

#!/usr/bin/env bash
# Publish throughput, side by side with the reference tools, in one run on one generated file.
#
#   benches/scripts/publish_vs.sh            # 1 GiB input, 5 runs per case (3 for casync)
#   SIZE_MIB=256 RUNS=3 benches/scripts/publish_vs.sh
#   FLEETWAVE_BIN=/path/to/fleetwave benches/scripts/publish_vs.sh   # no build: compare binaries
#
# Cases (median wall-clock seconds of RUNS runs; hyperfine if installed, else a bash loop):
#
#   openssl dgst -sha256     the whole-stream SHA-256 alone: the floor of a one-pass publish
#   publish, chunks present  republish to an origin that already holds every chunk: the pure
#                            pipeline (read, FastCDC, BLAKE3 per chunk, SHA-256 + BLAKE3 of the
#                            whole) plus a stat per chunk and a small manifest write
#   publish, new, tmpfs      first publish to an empty origin on tmpfs (/dev/shm): adds creating
#                            and writing one file per chunk, without a disk behind it
#   publish, new, disk       first publish to an empty origin on disk, durable (syncfs)
#   dd conv=fdatasync        copying the input to one file on the same disk, durable: the disk floor
#   casync make (tmpfs|disk) casync with its defaults (chunks 16/64/256 KiB, SHA-512/256, zstd)
#                            writing its store; casync never fsyncs, so the disk case is also
#                            timed with a `sync` after it, the durability publish gives
#
# Every disk run writes into a directory of its own and nothing is deleted until the end: on an
# ext4 without a journal (this machine's root), creating files shortly after many were deleted
# is several times slower (the inode allocator skips recently deleted inodes, rescanning them
# on every create), which would make each case pay for the previous one's clean-up. The disk
# cases therefore need about 20x SIZE_MIB of free space, which is checked first.
#
# Everything lives in temp dirs (WORK_PARENT, default /var/tmp, must be on disk; and /dev/shm)
# that are deleted on exit. Every timed step runs under `timeout STEP_TIMEOUT` (default 900 s).
# The JSON exports of hyperfine are copied to OUT_DIR if set.
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-5}
SLOW_RUNS=${SLOW_RUNS:-3}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
WORK_PARENT=${WORK_PARENT:-/var/tmp}
OUT_DIR=${OUT_DIR:-}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${FLEETWAVE_BIN:-$ROOT/target/release/fleetwave}

log() { printf '%s\n' "$*" >&2; }

need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2 (for $1)"
    if [ "$(id -u)" -eq 0 ]; then
        apt-get install -y -q "$2" >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$2" >/dev/null 2>&1; } || true
    fi
    command -v "$1" >/dev/null 2>&1
}

need openssl openssl || { log "openssl is required"; exit 1; }
need casync casync || { log "casync is required (apt-get install casync)"; exit 1; }
HAVE_HYPERFINE=0
need hyperfine hyperfine && HAVE_HYPERFINE=1

if [ -z "${FLEETWAVE_BIN:-}" ]; then
    log "building the release binary"
    (cd "$ROOT" && cargo build --release --quiet --bin fleetwave)
fi
BIN=$(realpath "$BIN")

need_kib=$((SIZE_MIB * 1024 * 20))
free_kib=$(df -Pk "$WORK_PARENT" | awk 'NR == 2 { print $4 }')
if [ "$free_kib" -lt "$need_kib" ]; then
    log "need $((need_kib / 1024 / 1024)) GiB free in $WORK_PARENT, have $((free_kib / 1024 / 1024)) GiB"
    exit 1
fi

WORK=$(mktemp -d "$WORK_PARENT/fleetwave-publish-vs.XXXXXX")
SHM=""
cleanup() {
    log "deleting $WORK"
    rm -rf -- "$WORK"
    if [ -n "$SHM" ]; then rm -rf -- "$SHM"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ -d /dev/shm ]; then SHM=$(mktemp -d /dev/shm/fleetwave-publish-vs.XXXXXX); fi

WORK_FS=$(stat -f -c %T "$WORK")
if [ "$WORK_FS" = tmpfs ]; then
    log "warning: $WORK is on tmpfs; the disk cases will not measure a disk (set WORK_PARENT)"
fi

INPUT="$WORK/input.bin"
BYTES=$((SIZE_MIB * 1024 * 1024))
log "generating $SIZE_MIB MiB of pseudo-random data in $INPUT"
openssl rand -out "$INPUT" "$BYTES" 2>/dev/null || head -c "$BYTES" /dev/urandom >"$INPUT"
sync
"$BIN" keygen --out "$WORK/key" >/dev/null

# Quoted once here so that paths with spaces survive the shell hyperfine runs commands in.
q() { printf '%q' "$1"; }
PUB="$(q "$BIN") publish $(q "$INPUT") --service bench --key $(q "$WORK/key") -q"
WARM_ORIGIN="$WORK/origin-warm"
log "seeding the warm origin"
eval "$PUB --version seed --origin $(q "$WARM_ORIGIN")" >/dev/null

RESULTS="$WORK/results.tsv"
: >"$RESULTS"

# bench NAME RUNS PREPARE COMMAND: appends "NAME<TAB>median<TAB>user+sys mean" to RESULTS.
bench() {
    local name=$1 runs=$2 prepare=$3 cmd=$4
    log ""
    log "== $name ($runs runs): $cmd"
    cat "$INPUT" >/dev/null # keep the input in the page cache: no case pays for reading the disk
    if [ "$HAVE_HYPERFINE" = 1 ]; then
        local json="$WORK/${name//[^A-Za-z0-9]/_}.json"
        timeout "$STEP_TIMEOUT" hyperfine --style basic --runs "$runs" \
            --prepare "$prepare" --command-name "$name" --export-json "$json" "$cmd" >&2
        if [ -n "$OUT_DIR" ]; then mkdir -p "$OUT_DIR" && cp "$json" "$OUT_DIR/"; fi
        jq -r --arg n "$name" '.results[0] | [$n, .median, (.user + .system)] | @tsv' \
            "$json" >>"$RESULTS"
    else
        local times=() t0 t1 cpu0 cpu1 i
        for ((i = 0; i < runs; i++)); do
            bash -c "$prepare"
            t0=$(date +%s%N)
            timeout "$STEP_TIMEOUT" bash -c "$cmd" >/dev/null
            t1=$(date +%s%N)
            times+=("$(((t1 - t0) / 1000))")
            log "  run $((i + 1)): $(awk -v us="${times[-1]}" 'BEGIN { printf "%.3f s", us / 1e6 }')"
        done
        printf '%s\n' "${times[@]}" | sort -n |
            awk -v n="$name" '{ t[NR] = $1 } END {
                m = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
                printf "%s\t%.6f\tnan\n", n, m / 1e6 }' >>"$RESULTS"
    fi
}

bench "openssl dgst -sha256" "$RUNS" "true" "openssl dgst -sha256 $(q "$INPUT")"
bench "publish, chunks present" "$RUNS" "true" \
    "$PUB --origin $(q "$WARM_ORIGIN") --version \"r\$(date +%s%N)\""
if [ -n "$SHM" ]; then
    bench "publish, new, tmpfs" "$RUNS" "rm -rf $(q "$SHM/origin")" \
        "$PUB --origin $(q "$SHM/origin") --version v1"
fi
# A fresh name per disk run (see the top): `$(date +%s%N)` costs about a millisecond.
FRESH='$(date +%s%N)'
bench "publish, new, disk" "$RUNS" "sync" \
    "$PUB --origin $(q "$WORK/origin-")$FRESH --version v1"
bench "dd conv=fdatasync" "$RUNS" "sync" \
    "dd if=$(q "$INPUT") of=$(q "$WORK/dd-")$FRESH bs=4M conv=fdatasync status=none"
if [ -n "$SHM" ]; then
    bench "casync make, tmpfs" "$SLOW_RUNS" "rm -rf $(q "$SHM/castore") $(q "$SHM/index.caibx")" \
        "casync make --store=$(q "$SHM/castore") $(q "$SHM/index.caibx") $(q "$INPUT") >/dev/null"
    rm -rf -- "$SHM/castore" "$SHM/index.caibx" "$SHM/origin"
fi
casync_disk() {
    printf 'n=%s; casync make --store=%s"$n" %s"$n".caibx %s >/dev/null' \
        "$FRESH" "$(q "$WORK/castore-")" "$(q "$WORK/index-")" "$(q "$INPUT")"
}
bench "casync make, disk" "$SLOW_RUNS" "sync" "$(casync_disk)"
bench "casync make, disk + sync" "$SLOW_RUNS" "sync" "$(casync_disk); sync"

# The report, on stdout.
sha_ni=no
grep -qw sha_ni /proc/cpuinfo && sha_ni=yes
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo
echo "fleetwave $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "$(git -C "$ROOT" diff --quiet 2>/dev/null || echo '(+ uncommitted changes)')"
echo "cpu: $cpu, $(nproc) cores, SHA-NI: $sha_ni; kernel $(uname -r)"
echo "input: $SIZE_MIB MiB pseudo-random in page cache; disk cases on $WORK_FS ($WORK_PARENT," \
    "$(findmnt -n -o FSTYPE,OPTIONS -T "$WORK_PARENT" 2>/dev/null || echo '?'))"
echo "$(openssl version | cut -d' ' -f1-2), casync $(casync --version 2>/dev/null | awk '{ print $2; exit }')," \
    "$([ "$HAVE_HYPERFINE" = 1 ] && hyperfine --version || echo 'bash loop')," \
    "median of $RUNS runs ($SLOW_RUNS for casync)"
echo
awk -F'\t' -v bytes="$BYTES" '
    { name[NR] = $1; t[NR] = $2; cpu[NR] = $3; idx[$1] = NR }
    function med(n) { return (n in idx) ? t[idx[n]] : 0 }
    function ratio(label, a, b) {
        if (med(a) > 0 && med(b) > 0) printf "  %-44s %6.2fx\n", label, med(a) / med(b)
    }
    END {
        printf "| %-26s | %9s | %7s | %10s |\n", "case", "median s", "GB/s", "CPU s mean"
        printf "|%s|%s|%s|%s|\n", "----------------------------", "----------:", "--------:", "-----------:"
        for (i = 1; i <= NR; i++) {
            c = (cpu[i] == "nan") ? "-" : sprintf("%.2f", cpu[i])
            printf "| %-26s | %9.3f | %7.3f | %10s |\n", name[i], t[i], bytes / t[i] / 1e9, c
        }
        print ""
        print "ratios (bar: publish <= 1.2x openssl; casync >= 5x publish):"
        ratio("publish chunks present / openssl", "publish, chunks present", "openssl dgst -sha256")
        ratio("publish new tmpfs / openssl", "publish, new, tmpfs", "openssl dgst -sha256")
        ratio("publish new disk / openssl", "publish, new, disk", "openssl dgst -sha256")
        ratio("publish new disk / dd conv=fdatasync", "publish, new, disk", "dd conv=fdatasync")
        ratio("casync tmpfs / publish new tmpfs", "casync make, tmpfs", "publish, new, tmpfs")
        ratio("casync disk / publish new disk", "casync make, disk", "publish, new, disk")
        ratio("casync disk + sync / publish new disk", "casync make, disk + sync", "publish, new, disk")
        ratio("casync disk + sync / publish chunks present", "casync make, disk + sync",
              "publish, chunks present")
    }' "$RESULTS"

#!/usr/bin/env bash
# Chunk-size measurement: how much of a new version does an origin already hold?
#
# For each pair of consecutive releases of a real tree (unpacked binary Python wheels from PyPI:
# native libraries, Python sources, data files), publish version 1 and then version 2 to a fresh
# origin, for FastCDC average sizes 16, 64 and 256 KiB (min = avg/4, max = avg*4), and do the same
# with `casync make` into a fresh store, with casync's chunker at the same three sizes. Prints one
# table: the v2 stream, its chunks, the chunks and bytes v2 adds to a store that holds v1, and the
# share of v2's bytes that is reused.
#
# Definitions (identical for both tools):
#   stream      bytes of the v2 stream the tool chunks (fleetwave: its packed tree; casync: its
#               .catar archive stream, which interleaves metadata with file contents)
#   chunks      chunks in v2 (with repeats)
#   new         distinct v2 chunks absent from v1, and their uncompressed bytes: what has to move
#   reused %    1 - new bytes / stream bytes
#   per 200MB   chunks a 200 MB artifact would have at this mean chunk size (swarm requests,
#               bitfield bits; the manifest costs ~37 bytes per chunk)
#   zstd new    casync only: growth of its store (chunks are stored zstd-compressed)
#
# Both tools see the same trees. Wheels are zip files, so they are unpacked first (compressed
# streams share nothing between versions), and every mtime is set to one fixed value: fleetwave
# normalizes mtimes itself, casync records them, and unzip would hand it the build times of each
# release, which would differ in every file header of the archive.
#
# Usage: benches/scripts/chunk_sizes.sh
# Environment:
#   FLEETWAVE     fleetwave binary (default: build target/release/fleetwave with cargo)
#   PAIRS         space-separated NAME:V1:V2 (default: numpy 2.1.1->2.1.2, scipy 1.14.0->1.14.1,
#                 pandas 2.2.2->2.2.3)
#   SIZES_KIB     average chunk sizes in KiB (default: "16 64 256")
#   WHEEL_TAGS    wheel selection, fixed so that every machine measures the same bytes
#                 (default: CPython 3.11, manylinux_2_17 x86_64)
#   STEP_TIMEOUT  seconds allowed to any one step (default 300); the whole run takes ~2 minutes
#                 on a 2-core machine
#   KEEP=1        keep the temporary directory
# Needs: python3 with pip, unzip (or python3's zipfile), casync (installed with apt-get when
# missing and running as root), network access to PyPI.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PAIRS=${PAIRS:-"numpy:2.1.1:2.1.2 scipy:1.14.0:1.14.1 pandas:2.2.2:2.2.3"}
SIZES_KIB=${SIZES_KIB:-"16 64 256"}
WHEEL_TAGS=${WHEEL_TAGS:-"--python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_17_x86_64"}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}

die() { echo "chunk_sizes.sh: $*" >&2; exit 1; }
step() { timeout "$STEP_TIMEOUT" "$@"; }

command -v python3 >/dev/null || die "python3 is required"
python3 -m pip --version >/dev/null 2>&1 || die "pip is required (python3 -m pip)"
if ! command -v casync >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "installing casync with apt-get" >&2
        step apt-get install -y -qq casync >/dev/null 2>&1 ||
            { step apt-get update -qq >/dev/null && step apt-get install -y -qq casync >/dev/null; } ||
            die "cannot install casync"
    else
        die "casync is required (Debian: apt-get install casync)"
    fi
fi

if [[ -z ${FLEETWAVE:-} ]]; then
    (cd "$ROOT" && step cargo build --release --quiet --bin fleetwave) || die "cargo build failed"
    FLEETWAVE=$ROOT/target/release/fleetwave
fi
[[ -x $FLEETWAVE ]] || die "no fleetwave binary at $FLEETWAVE"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fw-chunk-sizes.XXXXXX")
if [[ ${KEEP:-0} == 1 ]]; then
    echo "keeping $WORK" >&2
else
    trap 'rm -rf "$WORK"' EXIT
fi

# Reads a casync index (.caidx/.caibx) and prints "LENGTH HEXDIGEST" per chunk, in order.
# Layout (casync src/caformat.h): CaFormatIndex header (48 bytes), CaFormatTable header
# (16 bytes), then items of (u64 end offset, 32-byte digest), ended by a tail whose first
# field is 0.
cat >"$WORK/caidx.py" <<'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
(hsize,) = struct.unpack_from("<Q", data, 0)
pos, prev = hsize + 16, 0
while True:
    (end,) = struct.unpack_from("<Q", data, pos)
    if end == 0:
        break
    print(end - prev, data[pos + 8:pos + 40].hex())
    prev, pos = end, pos + 40
EOF

# Compares two "LENGTH HEXDIGEST" lists: prints "stream chunks new_chunks new_bytes".
cat >"$WORK/diff.py" <<'EOF'
import sys
def load(p):
    return [(int(l), h) for l, h in (line.split() for line in open(p))]
old = {h for _, h in load(sys.argv[1])}
new = load(sys.argv[2])
fresh = {h: l for l, h in new if h not in old}
print(sum(l for l, _ in new), len(new), len(fresh), sum(fresh.values()))
EOF

fetch() { # NAME VERSION -> unpacked tree at $WORK/tree/NAME-VERSION
    local name=$1 version=$2 dir=$WORK/tree/$1-$2
    mkdir -p "$WORK/dl/$name-$version" "$dir"
    # shellcheck disable=SC2086 # WHEEL_TAGS is a list of flags.
    step python3 -m pip download -q --no-deps --only-binary=:all: $WHEEL_TAGS \
        -d "$WORK/dl/$name-$version" "$name==$version" >&2 || die "cannot download $name==$version"
    local whl
    whl=$(ls "$WORK/dl/$name-$version"/*.whl)
    if command -v unzip >/dev/null; then
        unzip -q "$whl" -d "$dir"
    else
        python3 -m zipfile -e "$whl" "$dir"
    fi
    find "$dir" -exec touch -h -d @1700000000 {} +
}

field_bytes() { # LABEL FILE -> the "(N bytes)" figure of fleetwave's line LABEL
    sed -n "s/^$1:.*(\([0-9]*\) bytes).*/\1/p" "$2"
}
field_count() { # LABEL FILE -> the first number after LABEL
    sed -n "s/^$1: *\([0-9]*\).*/\1/p" "$2"
}

ROWS=$WORK/rows
: >"$ROWS"
row() { # pair tool avg stream chunks new_chunks new_bytes zstd_new
    python3 - "$@" >>"$ROWS" <<'EOF'
import sys
pair, tool, avg, stream, chunks, nch, nby, z = sys.argv[1:]
stream, chunks, nch, nby = int(stream), int(chunks), int(nch), int(nby)
reused = 100.0 * (1 - nby / stream)
per200 = 200e6 / (stream / chunks)
print(f"{pair}|{tool}|{avg}|{stream}|{chunks}|{nch}|{nby}|{reused:.1f}|{per200:.0f}|{z}")
EOF
}

"$FLEETWAVE" keygen --out "$WORK/key" >/dev/null
START=$SECONDS
for pair in $PAIRS; do
    IFS=: read -r name v1 v2 <<<"$pair"
    echo "== $name $v1 -> $v2" >&2
    fetch "$name" "$v1"
    fetch "$name" "$v2"
    t1=$WORK/tree/$name-$v1 t2=$WORK/tree/$name-$v2
    label="$name $v1->$v2"
    for kib in $SIZES_KIB; do
        avg=$((kib * 1024))
        # fleetwave: a fresh origin per size; v2's publish reports what the origin lacked.
        origin=$WORK/origin-$name-$kib
        step "$FLEETWAVE" publish "$t1" --service "$name" --version "$v1" --key "$WORK/key" \
            --origin "$origin" --chunk-avg "$avg" -q >"$WORK/fw1.out"
        step "$FLEETWAVE" publish "$t2" --service "$name" --version "$v2" --key "$WORK/key" \
            --origin "$origin" --chunk-avg "$avg" -q >"$WORK/fw2.out"
        row "$label" fleetwave "$kib KiB" "$(field_bytes size "$WORK/fw2.out")" \
            "$(field_count chunks "$WORK/fw2.out")" "$(field_count uploaded "$WORK/fw2.out")" \
            "$(field_bytes uploaded "$WORK/fw2.out")" -
        rm -rf "$origin"
        # casync: a fresh store per size, same min/avg/max rule.
        store=$WORK/store-$name-$kib
        cs="--chunk-size=$((avg / 4)):$avg:$((avg * 4))"
        step casync make "$cs" --store="$store" "$WORK/v1.caidx" "$t1" >/dev/null
        before=$(du -sb "$store" | cut -f1)
        step casync make "$cs" --store="$store" "$WORK/v2.caidx" "$t2" >/dev/null
        after=$(du -sb "$store" | cut -f1)
        python3 "$WORK/caidx.py" "$WORK/v1.caidx" >"$WORK/v1.list"
        python3 "$WORK/caidx.py" "$WORK/v2.caidx" >"$WORK/v2.list"
        read -r stream chunks nch nby < <(python3 "$WORK/diff.py" "$WORK/v1.list" "$WORK/v2.list")
        # Cross-check the index reading against the chunk files casync actually added.
        files=$(find "$store" -name '*.cacnk' | wc -l)
        v1files=$(sort -u -k2,2 "$WORK/v1.list" | wc -l)
        [[ $((files - v1files)) == "$nch" ]] ||
            die "casync index says $nch new chunks, store gained $((files - v1files)) files"
        row "$label" casync "$kib KiB" "$stream" "$chunks" "$nch" "$nby" "$((after - before))"
        rm -rf "$store"
    done
    rm -rf "$t1" "$t2"
done

echo
echo "fleetwave $("$FLEETWAVE" --version | awk '{print $2}'), $(casync --version | head -1)," \
    "$(nproc) cores, $((SECONDS - START)) s"
echo
python3 - "$ROWS" <<'EOF'
import sys
head = ["pair", "tool", "avg", "v2 stream B", "v2 chunks", "new chunks", "new B",
        "reused %", "chunks/200MB", "zstd new B"]
rows = [line.rstrip("\n").split("|") for line in open(sys.argv[1])]
w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
fmt = lambda r: "| " + " | ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i])
                                  for i, c in enumerate(r)) + " |"
print(fmt(head))
print("|" + "|".join("-" * (x + 2) if i < 3 else "-" * (x + 1) + ":"
                     for i, x in enumerate(w)) + "|")
for r in rows:
    print(fmt(r))
EOF

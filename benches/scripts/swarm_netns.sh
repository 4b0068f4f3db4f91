#!/usr/bin/env bash
# Swarm staging on one machine: N hosts and an origin (and optionally a cache), each in its own
# network namespace, on one Linux bridge, every link rate-limited in both directions.
#
#   benches/scripts/swarm_netns.sh                          # N=16, 128 MiB, 50 Mbit/s, origin only
#   N=24 RUNS=3 benches/scripts/swarm_netns.sh
#   benches/scripts/swarm_netns.sh --n 16 --cache 1         # hosts also get a regional cache
#   WORKLOAD=http N=2 SIZE_MIB=16 benches/scripts/swarm_netns.sh   # stand-in, no daemon (below)
#
# Parameters (environment, or the flag beside it; flags win):
#
#   N          --n          hosts (default 16, at most 250)
#   SIZE_MIB   --size-mib   artifact size (default 128): FILES files of seeded pseudo-random
#                           (incompressible) bytes, published as one directory
#   RATE_MBIT  --rate-mbit  rate of every link, each direction (default 50)
#   CACHE      --cache      0: origin only (default); 1: add a cache, the hosts' rendezvous
#   RUNS       --runs       runs (default 1); the final table gives medians
#   WORKLOAD   --workload   fleetwave (default): the real daemons; http: a stand-in that checks
#                           the plumbing (python http.server in the origin's namespace, every host
#                           downloads the whole artifact from it: no swarm, origin egress N x F)
#   QDISC      --qdisc      htb (default) or tbf, on both ends of every veth
#   QUEUE_MS                queue of each shaped direction in ms at the link rate (default 100)
#   FIFO                    pfifo (default): the queue holds QUEUE_MS of 1514-byte packets, but
#                           counts GSO batches as one; bfifo: it holds QUEUE_MS worth of bytes
#   MTU                     MTU of every veth and the bridge (default 1500; 9000: jumbo frames)
#   POLL_MS                 status poll interval (default 150)
#   IDLE_S, SETTLE_S        before the release, wait until the daemons use < 0.02 cores each over
#                           IDLE_S (default 1) seconds, at most SETTLE_S (default 20): start-up work
#                           (discovery, registrations) stays out of the measured window
#   FILES                   files in the artifact (default 32)
#   HOST_ARGS               extra flags for every host daemon (e.g. "--max-peers 4"), word-split
#   WORK_PARENT             where data dirs live (default /dev/shm: hosts share one disk here, a
#                           fleet does not; needs about (2N + 4) x SIZE_MIB free)
#   LOG_PARENT              where logs and results live (default /var/tmp)
#   KEEP=1      --keep      keep data and logs (otherwise logs are kept only for a failed run)
#   OUT=FILE                append every run's results (one JSON object a line) to FILE
#   SKIP_BUILD=1            use target/release as it is (or FLEETWAVE_BIN_DIR=DIR)
#
# Topology: a "switch" namespace holds the bridge and the bridge end of every veth (vo: origin
# 10.77.0.1, vc: cache 10.77.0.2, vh<i>: host i at 10.77.1.<i>); nothing touches the root
# namespace. Each veth is shaped at both ends: the egress of the node's eth0 (its upload) and
# the egress of the bridge end (its download), htb (one class, rate = ceil) or tbf, with a pfifo
# of QUEUE_MS worth of packets. `lo` is up in every namespace, IPv6 off.
#
# One run: fresh data dirs for the cache and the hosts (the origin keeps its store and identity),
# start the origin, wait for ready.json, the cache likewise, then all hosts; once every daemon
# is ready, a driver (python, one thread per host, each setns()'d into its host's namespace)
# releases all hosts at once with POST /v1/admin/stage and polls GET /v1/status every POLL_MS
# until all are staged, one failed, or 10 x T_min (at least 60 s) passed. Measured from the
# release to the last host seen staged:
#
#   time       time to all staged, and p50/p90 of the per-host completion times
#   T_min      max(F/u_src, F/d_host, N*F/(u_src + N*u_host)), F the artifact stream size,
#              u_src the origin's (plus the cache's) upload, d_host/u_host a host's link rate
#   egress     bytes the origin (cache) sent: rx_bytes of its veth's bridge end
#              (/sys/class/net/<veth>/statistics, read in the switch namespace), so IP/UDP/QUIC
#              headers and acks included; beside it the origin's own totals.served_bytes
#   CPU        /proc/stat deltas: busy % of both cores (100 % = both saturated), busy CPU-seconds,
#              the peak 1 s busy %; split into the daemons' own CPU-seconds (/proc/<pid>/stat, so
#              including the veth/bridge/tc softirq work done on their time), kernel threads
#              (ksoftirqd, kworkers), the driver, and the rest ("other": other sessions on the
#              machine); softirq is shown on its own too (tick accounting charges it to both)
#   also       what the hosts report getting from the origin, cache and peers; their syscall
#              reads and writes (/proc/<pid>/io) per F; packets on the links and their mean size
#
# One summary line per run, then a table (medians over runs). Exits non-zero with one line on a
# setup failure; a failed run prints the paths of its daemons' logs and stops the script.
# Namespaces are named fwsw<pid>-*, and are deleted on exit, as are the daemons (by pid).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --n) N=$2; shift 2 ;;
        --size-mib) SIZE_MIB=$2; shift 2 ;;
        --rate-mbit) RATE_MBIT=$2; shift 2 ;;
        --cache) CACHE=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --workload) WORKLOAD=$2; shift 2 ;;
        --qdisc) QDISC=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "swarm_netns: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

N=${N:-16}
SIZE_MIB=${SIZE_MIB:-128}
RATE_MBIT=${RATE_MBIT:-50}
CACHE=${CACHE:-0}
RUNS=${RUNS:-1}
WORKLOAD=${WORKLOAD:-fleetwave}
QDISC=${QDISC:-htb}
QUEUE_MS=${QUEUE_MS:-100}
FIFO=${FIFO:-pfifo}
MTU=${MTU:-1500}
POLL_MS=${POLL_MS:-150}
FILES=${FILES:-32}
WORK_PARENT=${WORK_PARENT:-/dev/shm}
LOG_PARENT=${LOG_PARENT:-/var/tmp}
KEEP=${KEEP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
READY_TIMEOUT=${READY_TIMEOUT:-60}
IDLE_S=${IDLE_S:-1}
SETTLE_S=${SETTLE_S:-20}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-3600}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PFX="fwsw$$"
SW="$PFX-sw"
ORIGIN_NS="$PFX-o"
CACHE_NS="$PFX-c"
ORIGIN_IP=10.77.0.1
CACHE_IP=10.77.0.2

die() { printf 'swarm_netns: %s\n' "$*" >&2; exit 1; }
log() { printf '%s\n' "$*" >&2; }
is_uint() { case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac; }

# ---- checks ----------------------------------------------------------------------------------
for v in N SIZE_MIB RATE_MBIT RUNS QUEUE_MS MTU POLL_MS FILES READY_TIMEOUT IDLE_S SETTLE_S; do
    is_uint "${!v}" && [ "${!v}" -gt 0 ] || die "$v must be a positive integer, not '${!v}'"
done
[ "$N" -le 250 ] || die "N must be at most 250 (hosts are 10.77.1.1-250)"
case "$CACHE" in 0 | 1) ;; *) die "CACHE must be 0 or 1, not '$CACHE'" ;; esac
case "$WORKLOAD" in fleetwave | http) ;; *) die "WORKLOAD must be fleetwave or http, not '$WORKLOAD'" ;; esac
case "$QDISC" in htb | tbf) ;; *) die "QDISC must be htb or tbf, not '$QDISC'" ;; esac
case "$FIFO" in pfifo | bfifo) ;; *) die "FIFO must be pfifo or bfifo, not '$FIFO'" ;; esac
[ "$WORKLOAD" = fleetwave ] || [ "$CACHE" = 0 ] || die "CACHE=1 needs WORKLOAD=fleetwave"
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, tc)"
command -v ip >/dev/null 2>&1 || die "ip (iproute2) not found: apt-get install iproute2"
command -v tc >/dev/null 2>&1 || die "tc (iproute2) not found: apt-get install iproute2"
PY=$(command -v /usr/bin/python3 || command -v python3 || true)
[ -n "$PY" ] || die "python3 not found (it drives the hosts): apt-get install python3"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "python3 >= 3.9 required"
ip netns list >/dev/null 2>&1 || die "ip netns does not work here"
# The daemons measured 20-35 CPU-seconds per GiB delivered to hosts on this machine.
if [ $((N * RATE_MBIT)) -gt 500 ]; then
    log "note: $N hosts x $RATE_MBIT Mbit/s need about $((N * RATE_MBIT * 25 / 8 / 1024)).$((N * RATE_MBIT * 250 / 8 / 1024 % 10)) cores at ~25 CPU-s per GiB delivered: expect the CPU, not the links, to bound the time on 2 cores"
fi
need_kib=$(((2 * N + 4) * SIZE_MIB * 1024))
free_kib=$(df -Pk "$WORK_PARENT" | awk 'NR == 2 { print $4 }')
[ "$free_kib" -ge "$need_kib" ] ||
    die "need $((need_kib / 1024)) MiB free in $WORK_PARENT, have $((free_kib / 1024)) MiB"

# Namespaces left by an earlier run of this script that was killed (its pid is gone).
for ns in $(ip netns list | awk '{print $1}' | grep -E '^fwsw[0-9]+-' || true); do
    owner=${ns#fwsw}
    owner=${owner%%-*}
    if [ ! -d "/proc/$owner" ]; then
        log "deleting stale namespace $ns"
        ip netns del "$ns" 2>/dev/null || true
    fi
done

# ---- state and clean-up ----------------------------------------------------------------------
WORK=""
LOGS=""
PIDS=()
HOST_PIDS=()
NAMESPACES=()
FAILED=0
DRIVER_PID=""

# stop_group PID...: SIGTERM, up to 5 s to exit, then SIGKILL.
stop_group() {
    local pid i alive
    [ $# -gt 0 ] || return 0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for i in $(seq 1 50); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 1 ] || break
        sleep 0.1
    done
    for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

# The hosts first, so that their logs do not fill with the rendezvous point going away.
stop_daemons() {
    stop_group ${HOST_PIDS[@]+"${HOST_PIDS[@]}"}
    stop_group ${PIDS[@]+"${PIDS[@]}"}
    HOST_PIDS=()
    PIDS=()
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$DRIVER_PID" ]; then
        kill -TERM "$DRIVER_PID" 2>/dev/null || true
        wait "$DRIVER_PID" 2>/dev/null || true
    fi
    stop_daemons
    local ns
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    if [ -n "$WORK" ]; then
        if [ "$KEEP" = 1 ]; then log "data kept in $WORK (delete it: it holds about (2N + 2) x SIZE_MIB)"; else rm -rf -- "$WORK"; fi
    fi
    if [ -n "$LOGS" ]; then
        if [ "$KEEP" = 1 ] || [ "$FAILED" = 1 ]; then
            log "logs kept in $LOGS"
        else
            rm -rf -- "$LOGS"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- build -----------------------------------------------------------------------------------
BIN_DIR=${FLEETWAVE_BIN_DIR:-$ROOT/target/release}
if [ "$WORKLOAD" = fleetwave ]; then
    if [ -z "${FLEETWAVE_BIN_DIR:-}" ] && [ "$SKIP_BUILD" != 1 ]; then
        log "building fleetwave-node and fleetwave (release)"
        (cd "$ROOT" && timeout "$BUILD_TIMEOUT" cargo build --release --quiet \
            -p fleetwave-node --bin fleetwave-node -p fleetwave --bin fleetwave) ||
            die "cargo build --release -p fleetwave-node -p fleetwave failed"
    fi
    NODE=$BIN_DIR/fleetwave-node
    CLI=$BIN_DIR/fleetwave
    [ -x "$NODE" ] || die "$NODE not found"
    [ -x "$CLI" ] || die "$CLI not found"
fi

WORK=$(mktemp -d "$WORK_PARENT/fleetwave-swarm.XXXXXX")
LOGS=$(mktemp -d "$LOG_PARENT/fleetwave-swarm.XXXXXX")
if [ "$WORKLOAD" = fleetwave ]; then
    # Private copies: another build may replace target/release/* while this runs.
    mkdir -p "$WORK/bin"
    cp "$NODE" "$CLI" "$WORK/bin/" || die "cannot copy the binaries to $WORK/bin"
    NODE=$WORK/bin/fleetwave-node
    CLI=$WORK/bin/fleetwave
fi
DRIVER=$LOGS/driver.py
RESULTS=$LOGS/results.jsonl

# ---- the driver (python) ---------------------------------------------------------------------
cat >"$DRIVER" <<'PYEOF'
"""swarm_netns.sh driver: releases every host at once, polls them, measures; or prints the table."""
import ctypes, http.client, json, math, os, statistics, subprocess, sys, threading, time

CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)
TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20


def enter_netns(name):
    """Moves the calling thread (only it) into the named network namespace."""
    fd = os.open("/run/netns/" + name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if LIBC.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "setns(%s): %s" % (name, os.strerror(err)))
    finally:
        os.close(fd)


def in_netns(name, fn):
    out = {}

    def body():
        try:
            enter_netns(name)
            out["v"] = fn()
        except Exception as e:  # noqa: BLE001
            out["e"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(30)
    if "e" in out:
        raise out["e"]
    return out.get("v")


class Client:
    """One keep-alive HTTP connection, reopened after an error."""

    def __init__(self, addr, timeout=5.0):
        host, port = addr.rsplit(":", 1)
        self.host, self.port, self.timeout, self.conn = host, int(port), timeout, None

    def request(self, method, path, body=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            hdrs = {"content-type": "application/json"} if body is not None else {}
            self.conn.request(method, path, body=data, headers=hdrs)
            r = self.conn.getresponse()
            return r.status, r.read()
        except Exception:
            self.conn.close()
            self.conn = None
            raise


def request(addr, method, path, body=None, timeout=5.0):
    c = Client(addr, timeout)
    try:
        return c.request(method, path, body)
    finally:
        if c.conn is not None:
            c.conn.close()


def proc_stat():
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def cpu_delta(a, b):
    d = [y - x for x, y in zip(a, b)]
    # user nice system idle iowait irq softirq steal
    return {"total": sum(d), "busy": d[0] + d[1] + d[2] + d[5] + d[6], "softirq": d[6], "steal": d[7]}


def pid_ticks(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    f = s[s.rindex(")") + 2:].split()
    return int(f[11]) + int(f[12])


def pid_io(pid):
    """(rchar, wchar) of a process: bytes it read and wrote through syscalls (files and sockets)."""
    try:
        with open("/proc/%d/io" % pid) as f:
            kv = dict(line.split(": ") for line in f.read().splitlines())
        return int(kv["rchar"]), int(kv["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def kthread_ticks():
    """CPU ticks of kernel threads (ksoftirqd, kworkers: network and tmpfs work done off-task)."""
    tot = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                s = f.read()
        except OSError:
            continue
        f = s[s.rindex(")") + 2:].split()
        if d == "2" or f[1] == "2":
            tot += int(f[11]) + int(f[12])
    return tot


def veth_counters(sw):
    script = ('for d in /sys/class/net/v*; do n=${d##*/}; s=$d/statistics; '
              'echo "$n $(cat $s/rx_bytes) $(cat $s/tx_bytes) $(cat $s/rx_packets) $(cat $s/tx_packets)"; done')
    out = subprocess.run(["ip", "netns", "exec", sw, "sh", "-c", script],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    res = {}
    for line in out.splitlines():
        name, rx, tx, rxp, txp = line.split()
        res[name] = (int(rx), int(tx), int(rxp), int(txp))
    return res


def pct(xs, p):
    xs = sorted(xs)
    return xs[max(0, math.ceil(p * len(xs)) - 1)]


def origin_served(cfg):
    if cfg["workload"] != "fleetwave":
        return None
    def get():
        st, body = request(cfg["origin_api"], "GET", "/v1/status")
        return json.loads(body)["totals"]["served_bytes"] if st == 200 else None
    try:
        return in_netns(cfg["origin_ns"], get)
    except Exception:  # noqa: BLE001
        return None


def run(cfg_path):
    cfg = json.load(open(cfg_path))
    hosts = cfg["hosts"]
    n = len(hosts)
    manifest = cfg.get("manifest")
    poll = cfg["poll_ms"] / 1000.0
    armed = threading.Barrier(n + 1)
    go = threading.Event()
    all_done = threading.Event()
    lock = threading.Lock()
    state = {"t0": None, "abort": None, "finished": 0}
    results = [dict(name=h["name"]) for h in hosts]

    def finish(r, error=None):
        with lock:
            if error and "error" not in r:
                r["error"] = error
                if state["abort"] is None:
                    state["abort"] = "%s: %s" % (r["name"], error)
                    all_done.set()
            state["finished"] += 1
            if state["finished"] == n:
                all_done.set()

    def fleetwave_host(h, r):
        api = h["api"]
        client = Client(api)
        # The daemon wrote ready.json; its API must answer before the release.
        for _ in range(100):
            try:
                if client.request("GET", "/v1/status")[0] == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("API %s does not answer" % api)
        armed.wait(cfg["ready_timeout"])
        if not go.wait(cfg["ready_timeout"]):
            raise RuntimeError("never released")
        t0 = state["t0"]
        st, body = client.request("POST", "/v1/admin/stage", {"manifest": manifest})
        r["posted"] = time.monotonic() - t0
        if st != 202:
            return "stage request answered %d: %s" % (st, body[:200].decode("utf-8", "replace"))
        errors = 0
        while True:
            if state["abort"] is not None:
                return "aborted"
            now = time.monotonic()
            if now - t0 > cfg["deadline_s"]:
                return "not staged after %.0f s" % cfg["deadline_s"]
            time.sleep(poll)
            try:
                st, body = client.request("GET", "/v1/status")
                js = json.loads(body)
                errors = 0
            except (OSError, ValueError, http.client.HTTPException) as e:
                errors += 1
                if errors >= 20:
                    return "status: %s" % e
                continue
            now = time.monotonic()
            entry = next((m for m in js.get("manifests", []) if m.get("id") == manifest), None)
            r["totals"] = js.get("totals")
            if entry is None:
                continue
            tr = entry.get("transfer") or {}
            if tr.get("progress"):
                r["progress"] = tr["progress"]
            if isinstance(tr.get("peers"), list):
                r["peers_max"] = max(r.get("peers_max", 0), len(tr["peers"]))
            if entry.get("status") == "staged":
                r["done"] = now - t0
                return None
            if entry.get("status") == "failed":
                return "failed: %s" % entry.get("error")

    def http_host(h, r):
        ip, port = cfg["http_origin"].rsplit(":", 1)
        c = None
        for _ in range(100):
            try:
                c = http.client.HTTPConnection(ip, int(port), timeout=10)
                c.connect()
                break
            except OSError:
                c = None
                time.sleep(0.1)
        if c is None:
            raise RuntimeError("origin %s does not answer" % cfg["http_origin"])
        armed.wait(cfg["ready_timeout"])
        if not go.wait(cfg["ready_timeout"]):
            raise RuntimeError("never released")
        t0 = state["t0"]
        c.request("GET", "/" + cfg["http_path"])
        resp = c.getresponse()
        if resp.status != 200:
            return "GET answered %d" % resp.status
        got = 0
        with open(os.path.join(h["dir"], "artifact"), "wb") as out:
            while True:
                if state["abort"] is not None:
                    return "aborted"
                if time.monotonic() - t0 > cfg["deadline_s"]:
                    return "not downloaded after %.0f s" % cfg["deadline_s"]
                b = resp.read(1 << 20)
                if not b:
                    break
                out.write(b)
                got += len(b)
        c.close()
        if got != cfg["size_bytes"]:
            return "got %d of %d bytes" % (got, cfg["size_bytes"])
        r["done"] = time.monotonic() - t0
        r["progress"] = {"origin_bytes": got}
        return None

    def worker(h, r):
        try:
            enter_netns(h["ns"])
            fn = fleetwave_host if cfg["workload"] == "fleetwave" else http_host
            err = fn(h, r)
        except threading.BrokenBarrierError:
            err = "not every host became ready"
        except Exception as e:  # noqa: BLE001
            err = "%s: %s" % (type(e).__name__, e)
        finish(r, err)

    threads = [threading.Thread(target=worker, args=(h, r), daemon=True) for h, r in zip(hosts, results)]
    for t in threads:
        t.start()
    try:
        armed.wait(cfg["ready_timeout"] + 5)
    except threading.BrokenBarrierError:
        errs = sorted({r.get("error", "?") for r in results if "error" in r})
        print("setup: hosts not ready: %s" % "; ".join(errs), file=sys.stderr)
        return 3

    pids = cfg["pids"]
    # Let the daemons settle (start-up work: discovery, registrations) before the release: wait
    # until they use less than 0.02 cores each over idle_s, at most settle_s; then that is the
    # idle baseline.
    def daemons_ticks():
        return {k: pid_ticks(v) for k, v in pids.items()}

    settle_t0 = time.monotonic()
    while True:
        i0, w0 = daemons_ticks(), time.monotonic()
        time.sleep(cfg.get("idle_s", 1.0))
        i1, w1 = daemons_ticks(), time.monotonic()
        idle_cores = sum((i1[k] - i0[k]) for k in pids if i0.get(k) is not None and i1.get(k) is not None) \
            / TCK / (w1 - w0)
        if idle_cores < 0.02 * len(pids) or w1 - settle_t0 >= cfg.get("settle_s", 20):
            break
    settle_s = time.monotonic() - settle_t0
    c0 = veth_counters(cfg["sw_ns"])
    served0 = origin_served(cfg)
    p0 = {k: pid_ticks(v) for k, v in pids.items()}
    io0 = {k: pid_io(v) for k, v in pids.items()}
    k0 = kthread_ticks()
    s0 = proc_stat()
    me0 = os.times()
    state["t0"] = t0 = time.monotonic()
    go.set()

    peak = 0.0
    window = [(t0, s0)]
    hard_end = t0 + cfg["deadline_s"] + 15
    while not all_done.wait(0.25):
        now = time.monotonic()
        s = proc_stat()
        window.append((now, s))
        while len(window) > 2 and now - window[1][0] >= 1.0:
            window.pop(0)
        if now - window[0][0] >= 0.95:
            d = cpu_delta(window[0][1], s)
            if d["total"]:
                peak = max(peak, 100.0 * d["busy"] / d["total"])
        if now > hard_end:
            state["abort"] = state["abort"] or "driver deadline"
            break
    s1 = proc_stat()
    me1 = os.times()
    k1 = kthread_ticks()
    t_end = time.monotonic()
    p1 = {k: pid_ticks(v) for k, v in pids.items()}
    io1 = {k: pid_io(v) for k, v in pids.items()}
    c1 = veth_counters(cfg["sw_ns"])
    served1 = origin_served(cfg)
    for t in threads:
        t.join(10)

    F = cfg["size_bytes"]
    failed = [r for r in results if "error" in r]
    done = [r["done"] for r in results if "done" in r]
    cpu = cpu_delta(s0, s1)
    wall = t_end - t0

    def egress(dev):
        if dev not in c0 or dev not in c1:
            return None
        return c1[dev][0] - c0[dev][0]

    def ingress(dev):
        if dev not in c0 or dev not in c1:
            return None
        return c1[dev][1] - c0[dev][1]

    def ticks(keys):
        tot = 0
        for k in keys:
            if p0.get(k) is None or p1.get(k) is None:
                continue
            tot += p1[k] - p0[k]
        return tot / TCK

    def packets(dev):
        if dev not in c0 or dev not in c1:
            return 0
        return c1[dev][2] - c0[dev][2]

    host_up = sum(egress(h["veth"]) or 0 for h in hosts)
    host_up_packets = sum(packets(h["veth"]) for h in hosts) + packets("vo") + packets("vc")
    host_down = sum(ingress(h["veth"]) or 0 for h in hosts)
    src = {}
    for r in results:
        for k, v in (r.get("progress") or {}).items():
            if k.endswith("_bytes"):
                src[k] = src.get(k, 0) + v
    res = {
        "workload": cfg["workload"], "n": n, "cache": cfg["cache"], "size_bytes": F,
        "size_mib": cfg["size_mib"], "rate_mbit": cfg["rate_mbit"], "qdisc": cfg["qdisc"],
        "mtu": cfg["mtu"], "fifo": cfg["fifo"],
        "run": cfg["run"], "runs": cfg["runs"], "ok": not failed and len(done) == n,
        "error": state["abort"] or (failed[0]["error"] if failed else None),
        "time_s": max(done) if len(done) == n else None,
        "p50_s": pct(done, 0.5) if done else None, "p90_s": pct(done, 0.9) if done else None,
        "first_s": min(done) if done else None,
        "tmin_s": cfg["tmin_s"], "wall_s": wall,
        "origin_egress": egress("vo"), "origin_ingress": ingress("vo"),
        "cache_egress": egress("vc") if cfg["cache"] else None,
        "origin_served": (served1 - served0) if served0 is not None and served1 is not None else None,
        "hosts_upload": host_up, "hosts_download": host_down, "sources": src,
        "packets": host_up_packets,
        "mean_packet": (host_up + (egress("vo") or 0) + (egress("vc") or 0)) / host_up_packets
        if host_up_packets else None,
        "cpu_busy_pct": 100.0 * cpu["busy"] / cpu["total"] if cpu["total"] else None,
        "cpu_s": cpu["busy"] / TCK, "softirq_s": cpu["softirq"] / TCK, "steal_s": cpu["steal"] / TCK,
        "cpu_peak_pct": peak, "daemons_cpu_s": ticks(pids.keys()),
        "driver_cpu_s": (me1.user + me1.system) - (me0.user + me0.system),
        "origin_cpu_s": ticks(["origin"]), "idle_daemons_cores": idle_cores, "settle_s": settle_s, "cache_cpu_s": ticks(["cache"]) if cfg["cache"] else None,
        "loadavg_before": cfg.get("loadavg"),
        "hosts": results,
    }
    # Tick-based accounting: a softirq tick is also charged to the task it interrupted.
    res["kthreads_cpu_s"] = (k1 - k0) / TCK
    res["other_cpu_s"] = max(0.0, res["cpu_s"] - res["daemons_cpu_s"] - res["driver_cpu_s"] - res["kthreads_cpu_s"])
    res["hosts_cpu_s"] = ticks([k for k in pids if k.startswith("h")])
    hk = [k for k in pids if k.startswith("h") and io0.get(k) and io1.get(k)]
    if hk:
        res["host_wchar_per_f"] = sum(io1[k][1] - io0[k][1] for k in hk) / len(hk) / F
        res["host_rchar_per_f"] = sum(io1[k][0] - io0[k][0] for k in hk) / len(hk) / F
    if res["time_s"]:
        res["ratio"] = res["time_s"] / res["tmin_s"]
    with open(cfg["results"], "a") as f:
        f.write(json.dumps(res) + "\n")
    print(summary_line(res))
    if not res["ok"]:
        for r in failed[:5]:
            print("  %s: %s" % (r["name"], r["error"]), file=sys.stderr)
        return 2
    return 0


def fx(v, fmt="%.2f", none="-"):
    return none if v is None else fmt % v


def summary_line(r):
    F = r["size_bytes"]
    head = "run %d/%d %s N=%d F=%.1fMiB %dMbit/s MTU %d %s cache=%d:" % (
        r["run"], r["runs"], r["workload"], r["n"], F / MIB, r["rate_mbit"], r["mtu"], r["fifo"],
        r["cache"])
    if r["ok"]:
        t = "all staged %.2f s (p50 %.2f, p90 %.2f, first %.2f), T_min %.2f s, %.2fx" % (
            r["time_s"], r["p50_s"], r["p90_s"], r["first_s"], r["tmin_s"], r["ratio"])
    else:
        t = "FAILED after %.1f s (%d/%d staged): %s" % (
            r["wall_s"], sum(1 for h in r["hosts"] if "done" in h), r["n"], r["error"])
    eg = "origin egress %.1f MiB = %.2fx F (served %s)" % (
        (r["origin_egress"] or 0) / MIB, (r["origin_egress"] or 0) / F,
        fx(r["origin_served"] / F if r["origin_served"] is not None else None, "%.2fx F"))
    if r["cache"]:
        eg += ", cache egress %.2fx F" % ((r["cache_egress"] or 0) / F)
    eg += ", hosts up %.2fx F" % (r["hosts_upload"] / F)
    if r.get("host_wchar_per_f") is not None:
        eg += ", per host syscall writes %.2fx F, reads %.2fx F" % (r["host_wchar_per_f"], r["host_rchar_per_f"])
    if r.get("packets"):
        eg += ", %d packets of %.0f B mean" % (r["packets"], r["mean_packet"])
    src = r.get("sources") or {}
    if r["workload"] == "fleetwave" and src:
        peers = [h.get("peers_max") for h in r["hosts"] if h.get("peers_max") is not None]
        eg += "; hosts got origin %.2fx, cache %.2fx, peers %.2fx F (%s peers max)" % (
            src.get("origin_bytes", 0) / F, src.get("cache_bytes", 0) / F, src.get("peer_bytes", 0) / F,
            max(peers) if peers else "?")
    cpu = ("CPU %.0f%% of 2 cores (peak 1 s %.0f%%), %.1f CPU-s: daemons %.1f (origin %.1f%s), "
           "kernel threads %.1f, driver %.1f, other %.1f; softirq %.1f of all that; daemons idle before %.2f cores (settled in %.0f s); "
           "load before %s") % (
        r["cpu_busy_pct"] or 0, r["cpu_peak_pct"], r["cpu_s"], r["daemons_cpu_s"], r["origin_cpu_s"],
        ", cache %.1f" % r["cache_cpu_s"] if r["cache"] else "", r["kthreads_cpu_s"], r["driver_cpu_s"],
        r["other_cpu_s"], r["softirq_s"], r.get("idle_daemons_cores", 0), r.get("settle_s", 0), "/".join(r["loadavg_before"] or []))
    return "%s %s | %s | %s" % (head, t, eg, cpu)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table(path, bar_ratio, bar_egress, bar_cpu):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    groups = {}
    for r in rows:
        k = (r["workload"], r["n"], r["cache"], r["size_mib"], r["rate_mbit"], r["qdisc"],
             r.get("mtu", 1500), r.get("fifo", "pfifo"))
        groups.setdefault(k, []).append(r)
    print()
    print("| workload | N | cache | MiB | Mbit/s | MTU | queue | runs ok | time s | p50 s | p90 s | T_min s | ratio "
          "| origin egress / F | served / F | cache egress / F | CPU % | peak % | CPU-s | daemons CPU-s | other CPU-s | bar |")
    print("|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
    for k, rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        F = rs[0]["size_bytes"]
        ratio = med([r.get("ratio") for r in ok])
        oeg = med([r["origin_egress"] / F for r in ok if r["origin_egress"] is not None])
        cpu = med([r["cpu_busy_pct"] for r in ok])
        if not ok:
            bar = "failed"
        elif k[0] != "fleetwave":
            bar = "(stand-in)"
        elif k[2]:
            bar = "(cache)"
        else:
            met = ratio <= bar_ratio and oeg <= bar_egress and cpu < bar_cpu
            bar = "met" if met else "NOT met"
        print("| %s | %d | %d | %d | %d | %d | %s | %d/%d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            k[0], k[1], k[2], k[3], k[4], k[6], k[7], len(ok), len(rs),
            fx(med([r["time_s"] for r in ok])), fx(med([r["p50_s"] for r in ok])),
            fx(med([r["p90_s"] for r in ok])), fx(rs[0]["tmin_s"]), fx(ratio),
            fx(oeg), fx(med([r["origin_served"] / F for r in ok if r["origin_served"] is not None])),
            fx(med([r["cache_egress"] / F for r in ok if r["cache_egress"] is not None])),
            fx(cpu, "%.0f"), fx(med([r["cpu_peak_pct"] for r in ok]), "%.0f"),
            fx(med([r["cpu_s"] for r in ok]), "%.1f"), fx(med([r["daemons_cpu_s"] for r in ok]), "%.1f"),
            fx(med([r["other_cpu_s"] for r in ok]), "%.1f"), bar))
    print()
    print("bar (origin only): time <= %.1fx T_min, origin egress <= %.1fx F, CPU busy < %d%% of 2 cores"
          % (bar_ratio, bar_egress, bar_cpu))


if __name__ == "__main__":
    if sys.argv[1] == "run":
        sys.exit(run(sys.argv[2]))
    elif sys.argv[1] == "table":
        table(sys.argv[2], 1.3, 1.2, 90)
PYEOF

# ---- network ---------------------------------------------------------------------------------
RATE_BPS=$((RATE_MBIT * 1000000 / 8))
QLIMIT=$((RATE_BPS * QUEUE_MS / 1000 / 1514))
[ "$QLIMIT" -ge 16 ] || QLIMIT=16
QBYTES=$((RATE_BPS * QUEUE_MS / 1000))
[ "$QBYTES" -ge $((16 * 1514)) ] || QBYTES=$((16 * 1514))

# shape NS DEV: rate-limit the egress of DEV inside NS.
shape() {
    local ns=$1 dev=$2
    if [ "$QDISC" = htb ]; then
        tc -n "$ns" qdisc replace dev "$dev" root handle 1: htb default 1 &&
            tc -n "$ns" class add dev "$dev" parent 1: classid 1:1 htb \
                rate "${RATE_MBIT}mbit" ceil "${RATE_MBIT}mbit" quantum 60000 &&
            if [ "$FIFO" = bfifo ]; then
                tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: bfifo limit "$QBYTES"
            else
                tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: pfifo limit "$QLIMIT"
            fi
    else
        tc -n "$ns" qdisc replace dev "$dev" root handle 1: tbf \
            rate "${RATE_MBIT}mbit" burst 32kb limit $((QLIMIT * 1514))
    fi
}

add_ns() {
    ip netns add "$1" || die "cannot create network namespace $1"
    NAMESPACES=("$1" "${NAMESPACES[@]}")
    ip -n "$1" link set lo up || die "cannot bring up lo in $1"
    ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 \
        >/dev/null 2>&1 || true
}

# add_node NS VETH IP: a namespace wired to the bridge by veth VETH (bridge end) / eth0.
add_node() {
    local ns=$1 veth=$2 addr=$3
    add_ns "$ns"
    ip link add "$veth" netns "$SW" type veth peer name eth0 netns "$ns" ||
        die "cannot create veth $veth for $ns"
    ip -n "$SW" link set "$veth" mtu "$MTU" master br0 up || die "cannot attach $veth to the bridge"
    ip -n "$ns" link set eth0 mtu "$MTU" || die "cannot set MTU $MTU on eth0 in $ns"
    ip -n "$ns" addr add "$addr/16" dev eth0 || die "cannot address eth0 in $ns"
    ip -n "$ns" link set eth0 up || die "cannot bring up eth0 in $ns"
    shape "$ns" eth0 || die "tc $QDISC failed on eth0 in $ns"
    shape "$SW" "$veth" || die "tc $QDISC failed on $veth"
}

log "setting up: switch, origin$([ "$CACHE" = 1 ] && echo ", cache"), $N hosts; $QDISC ${RATE_MBIT} Mbit/s each way, queue $([ "$FIFO" = bfifo ] && echo "$QBYTES bytes" || echo "$QLIMIT packets"), MTU $MTU"
add_ns "$SW"
ip -n "$SW" link add br0 type bridge stp_state 0 forward_delay 0 || die "cannot create the bridge"
# A switch does not run iptables: keep br_netfilter (if loaded) out of the bridged path.
ip netns exec "$SW" sh -c 'for f in /proc/sys/net/bridge/bridge-nf-call-*; do [ -e "$f" ] && echo 0 >"$f"; done; true'
ip -n "$SW" link set br0 up || die "cannot bring up the bridge"
add_node "$ORIGIN_NS" vo "$ORIGIN_IP"
[ "$CACHE" = 0 ] || add_node "$CACHE_NS" vc "$CACHE_IP"
for i in $(seq 1 "$N"); do add_node "$PFX-h$i" "vh$i" "10.77.1.$i"; done
# One ping across the bridge (if ping is installed): the wiring works before anything is timed.
if command -v ping >/dev/null 2>&1; then
    ip netns exec "$PFX-h$N" ping -q -c 1 -W 2 "$ORIGIN_IP" >/dev/null 2>&1 ||
        die "host $N cannot reach the origin at $ORIGIN_IP across the bridge"
fi

# ---- artifact --------------------------------------------------------------------------------
SRC=$WORK/artifact
ORIGIN_DATA=$WORK/origin
mkdir -p "$SRC" "$ORIGIN_DATA"
log "generating $SIZE_MIB MiB of seeded pseudo-random data in $FILES files"
"$PY" - "$SRC" "$SIZE_MIB" "$FILES" <<'PYEOF' || die "cannot generate the artifact"
import os, random, sys
out, mib, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
total = mib << 20
files = max(1, min(files, total >> 16))
rng = random.Random(20240601)
for i in range(files):
    n = total // files + (1 if i < total % files else 0)
    with open(os.path.join(out, "part-%03d.bin" % i), "wb") as f:
        while n > 0:
            k = min(n, 4 << 20)
            f.write(rng.randbytes(k))
            n -= k
PYEOF

if [ "$WORKLOAD" = fleetwave ]; then
    KEYDIR=$WORK/keys
    mkdir -p "$KEYDIR"
    "$CLI" keygen --out "$KEYDIR/release.key" >"$LOGS/keygen.out" 2>&1 ||
        die "fleetwave keygen failed: $(tail -n 1 "$LOGS/keygen.out")"
    "$CLI" publish "$SRC" --service bench --version 1 --key "$KEYDIR/release.key" \
        --origin "$ORIGIN_DATA/store" >"$LOGS/publish.out" 2>&1 ||
        die "fleetwave publish failed: $(tail -n 1 "$LOGS/publish.out")"
    MANIFEST=$(sed -n 's/^manifest:[[:space:]]*\([0-9a-f]\{64\}\).*/\1/p' "$LOGS/publish.out" | head -n 1)
    SIZE_BYTES=$(sed -n 's/^size:.*(\([0-9]*\) bytes).*/\1/p' "$LOGS/publish.out" | head -n 1)
    [ -n "$MANIFEST" ] || die "no manifest id in the publish output ($LOGS/publish.out)"
    [ -n "$SIZE_BYTES" ] || die "no size in the publish output ($LOGS/publish.out)"
    log "published $MANIFEST: $(sed -n 's/^size:[[:space:]]*//p; s/^chunks:[[:space:]]*/chunks /p' "$LOGS/publish.out" | paste -sd ',' | sed 's/,/, /g')"
else
    cat "$SRC"/part-*.bin >"$ORIGIN_DATA/artifact.bin"
    rm -rf -- "$SRC"
    SIZE_BYTES=$(stat -c %s "$ORIGIN_DATA/artifact.bin")
    MANIFEST=""
fi

# T_min = max(F/u_src, F/d_host, N*F/(u_src + N*u_host)), every link at RATE_BPS.
TMIN=$("$PY" -c '
import sys
F, n, r, c = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
u_src = r * (1 + c)
print("%.4f" % max(F / u_src, F / r, n * F / (u_src + n * r)))' "$SIZE_BYTES" "$N" "$RATE_BPS" "$CACHE")
DEADLINE=$("$PY" -c 'import sys; print("%.1f" % max(60.0, 10 * float(sys.argv[1])))' "$TMIN")
log "F = $SIZE_BYTES bytes, T_min = $TMIN s, deadline $DEADLINE s per run"

# ---- daemons ---------------------------------------------------------------------------------
# wait_ready FILE PID: until FILE exists (0), the process exits (1), or READY_TIMEOUT (2).
wait_ready() {
    local file=$1 pid=$2 i
    for i in $(seq 1 $((READY_TIMEOUT * 10))); do
        [ -s "$file" ] && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 2
}

# not_ready NAME LOG STATUS: why a daemon is not ready, in one line.
not_ready() {
    if [ "$3" = 1 ]; then
        echo "the $1 exited before writing ready.json: $(tail -n 1 "$2")"
    else
        echo "the $1 did not write ready.json within ${READY_TIMEOUT} s: $(tail -n 1 "$2")"
    fi
}

peer_id_of() {
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["peer_id"])' "$1"
}

run_failed() {
    FAILED=1
    log "run $1 failed: $2"
    log "daemon logs:"
    local f
    for f in "$RUN_LOGS"/*.log; do [ -e "$f" ] && log "  $f"; done
    stop_daemons
    "$PY" "$DRIVER" table "$RESULTS" 2>/dev/null || true
    exit 3
}

for run in $(seq 1 "$RUNS"); do
    RUN_LOGS=$LOGS/run$run
    RUN_DATA=$WORK/run$run
    mkdir -p "$RUN_LOGS" "$RUN_DATA"
    declare -A ROLE_PID=()
    if [ "$WORKLOAD" = fleetwave ]; then
        rm -f "$ORIGIN_DATA/ready.json"
        NO_COLOR=1 FLEETWAVE_LOG=${FLEETWAVE_LOG:-info} ip netns exec "$ORIGIN_NS" "$NODE" --role origin \
            --data-dir "$ORIGIN_DATA" --listen-api "$ORIGIN_IP:7400" --listen-chunks "$ORIGIN_IP:7401" \
            --listen-p2p "$ORIGIN_IP:7402" --trust "$KEYDIR/release.key.pub" \
            >"$RUN_LOGS/origin.log" 2>&1 &
        PIDS+=("$!")
        ROLE_PID[origin]=$!
        st=0
        wait_ready "$ORIGIN_DATA/ready.json" "$!" || st=$?
        [ "$st" = 0 ] || run_failed "$run" "$(not_ready origin "$RUN_LOGS/origin.log" "$st")"
        ORIGIN_ID=$(peer_id_of "$ORIGIN_DATA/ready.json")
        UPSTREAM=(--origin "http://$ORIGIN_IP:7400=$ORIGIN_ID")
        if [ "$CACHE" = 1 ]; then
            CDATA=$RUN_DATA/cache
            mkdir -p "$CDATA"
            NO_COLOR=1 FLEETWAVE_LOG=${FLEETWAVE_LOG:-info} ip netns exec "$CACHE_NS" "$NODE" --role cache \
                --data-dir "$CDATA" --listen-api "$CACHE_IP:7400" --listen-chunks "$CACHE_IP:7401" \
                --listen-p2p "$CACHE_IP:7402" --trust "$KEYDIR/release.key.pub" "${UPSTREAM[@]}" \
                >"$RUN_LOGS/cache.log" 2>&1 &
            PIDS+=("$!")
            ROLE_PID[cache]=$!
            st=0
            wait_ready "$CDATA/ready.json" "$!" || st=$?
            [ "$st" = 0 ] || run_failed "$run" "$(not_ready cache "$RUN_LOGS/cache.log" "$st")"
            UPSTREAM+=(--cache "http://$CACHE_IP:7400=$(peer_id_of "$CDATA/ready.json")")
        fi
        for i in $(seq 1 "$N"); do
            HDATA=$RUN_DATA/h$i
            mkdir -p "$HDATA"
            NO_COLOR=1 FLEETWAVE_LOG=${FLEETWAVE_LOG:-info} ip netns exec "$PFX-h$i" "$NODE" --role host \
                --data-dir "$HDATA" --listen-api 127.0.0.1:7400 --listen-chunks "10.77.1.$i:7401" \
                --listen-p2p "10.77.1.$i:7402" --trust "$KEYDIR/release.key.pub" "${UPSTREAM[@]}" \
                ${HOST_ARGS:-} >"$RUN_LOGS/h$i.log" 2>&1 &
            PIDS+=("$!")
            HOST_PIDS+=("$!")
            ROLE_PID[h$i]=$!
        done
        for i in $(seq 1 "$N"); do
            st=0
            wait_ready "$RUN_DATA/h$i/ready.json" "${ROLE_PID[h$i]}" || st=$?
            [ "$st" = 0 ] || run_failed "$run" "$(not_ready "host $i" "$RUN_LOGS/h$i.log" "$st")"
        done
    else
        ip netns exec "$ORIGIN_NS" "$PY" -m http.server 8000 --bind "$ORIGIN_IP" \
            --directory "$ORIGIN_DATA" >"$RUN_LOGS/origin.log" 2>&1 &
        PIDS+=("$!")
        ROLE_PID[origin]=$!
        for i in $(seq 1 "$N"); do mkdir -p "$RUN_DATA/h$i"; done
    fi

    CFG=$RUN_LOGS/driver.json
    "$PY" - "$CFG" <<PYEOF || die "cannot write the driver configuration"
import json, sys
n = $N
pids = {$(for k in "${!ROLE_PID[@]}"; do printf '"%s": %s, ' "$k" "${ROLE_PID[$k]}"; done)}
cfg = {
    "workload": "$WORKLOAD", "run": $run, "runs": $RUNS, "cache": $CACHE, "qdisc": "$QDISC",
    "size_bytes": $SIZE_BYTES, "size_mib": $SIZE_MIB, "rate_mbit": $RATE_MBIT,
    "mtu": $MTU, "fifo": "$FIFO",
    "tmin_s": $TMIN, "deadline_s": $DEADLINE, "idle_s": $IDLE_S, "settle_s": $SETTLE_S,
    "poll_ms": $POLL_MS, "ready_timeout": $READY_TIMEOUT,
    "manifest": "$MANIFEST", "sw_ns": "$SW", "origin_ns": "$ORIGIN_NS",
    "origin_api": "$ORIGIN_IP:7400", "http_origin": "$ORIGIN_IP:8000", "http_path": "artifact.bin",
    "results": "$RESULTS", "pids": pids, "loadavg": open("/proc/loadavg").read().split()[:3],
    "hosts": [{"name": "h%d" % i, "ns": "$PFX-h%d" % i, "veth": "vh%d" % i,
               "api": "127.0.0.1:7400", "dir": "$RUN_DATA/h%d" % i} for i in range(1, n + 1)],
}
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
PYEOF
    log "run $run/$RUNS: releasing $N hosts (load average before: $(cut -d' ' -f1-3 /proc/loadavg))"
    rc=0
    # In the background, so that a signal to this script is handled at once (cleanup kills it).
    "$PY" "$DRIVER" run "$CFG" </dev/null &
    DRIVER_PID=$!
    wait "$DRIVER_PID" || rc=$?
    DRIVER_PID=""
    [ "$rc" = 0 ] || run_failed "$run" "driver exit status $rc"
    stop_daemons
    unset ROLE_PID
    [ "$KEEP" = 1 ] || rm -rf -- "$RUN_DATA"
done

"$PY" "$DRIVER" table "$RESULTS"
if [ -n "${OUT:-}" ]; then cat "$RESULTS" >>"$OUT" && log "results appended to $OUT"; fi
if [ "$KEEP" = 1 ]; then log "results: $RESULTS"; fi

#!/usr/bin/env bash
# compare.sh: absconda against what users do today, end to end.
#
# Why: the claim that an incremental sync makes remote builds fast is only
# worth what a measurement on the same machine, context and links says. This
# script builds the same reference context with
#   - absconda build (incremental sync, the default),
#   - tar -c ctx | ssh host docker build -            (OpenSSH)
#   - DOCKER_HOST=ssh://host docker build ctx         (docker CLI over ssh)
#   - rsync -a ctx host:dir && ssh host docker build dir
#   - rsync -az ... (on the slow link only, for the compression target)
# in four cases (cold with the build cache pruned, no change, one 5 MiB file
# changed, one small file changed) over three links: loopback, a 50 Mbit/s
# tbf-shaped veth into a network namespace where a second sshd runs, and a
# 100 ms round trip (benches/tools/delay_proxy.rs in front of the loopback
# sshd, 50 ms each way; it listens on the veth's host address, so absconda
# treats it as the remote link it stands for). It sets up its own dockerd,
# sshds and namespace and tears them down on exit.
#
# Usage: benches/compare.sh            (about 10-15 minutes)
#   BENCH_LINKS="loopback slow rtt"  BENCH_CASES="cold nochange big small"
#   BENCH_METHODS="absconda tarssh dockerssh rsync rsyncz"  BENCH_RSS=1 (2 GiB RSS run)
#   BENCH_RUNS_LOOPBACK=3 BENCH_RUNS_SLOW=1 BENCH_RUNS_RTT=1  BENCH_RTT_MS=100
#   BENCH_RUST_LOG=absconda=debug
#   BENCH_OUT=target/bench-compare (results)  BENCH_KEEP=1 keeps the work folder.  Must run as root (netns, tc, dockerd).
#
# The builder side logs in as a temporary user `absbench` (shell /bin/sh,
# allowed on the bench's dockerd socket), created here and removed on exit,
# like the non-root user of a stock cloud VM. Logging in as root on this
# machine would measure root's ~/.bashrc (pyenv init, 0.1 s per command, run
# by bash for every SSH command) more than any of the tools compared.
# BENCH_USER=root keeps root anyway.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LINKS=${BENCH_LINKS-"loopback slow rtt"}
CASES=${BENCH_CASES-"cold nochange big small"}
METHODS=${BENCH_METHODS-"absconda tarssh dockerssh rsync rsyncz"}
RATE=${BENCH_RATE:-50mbit}
# Results (tsv, markdown table, absconda logs) land here.
OUT=${BENCH_OUT:-$ROOT/target/bench-compare}
# Repetitions of each method's cold/nochange/big/small sequence; the table
# shows medians. The shaped link is slow and steady, loopback is noisy.
RUNS_loopback=${BENCH_RUNS_LOOPBACK:-3}
RUNS_slow=${BENCH_RUNS_SLOW:-1}
RUNS_rtt=${BENCH_RUNS_RTT:-1}
RTT_MS=${BENCH_RTT_MS:-100}
# Short: unix socket paths are limited to 108 bytes.
WORK=$(mktemp -d /tmp/abx.XXXXXX)
NS=absbench
VH=absb-h
VN=absb-n
HOST_IP=10.231.0.1
NS_IP=10.231.0.2
CLI=/usr/bin/docker   # docker.io's client: understands DOCKER_BUILDKIT=1
PIDS=()
BUSER=${BENCH_USER:-absbench}
CREATED_USER=

log() { printf '%s\n' "$*" >&2; }
die() { log "compare.sh: $*"; exit 1; }

cleanup() {
  set +e
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  # dockerd needs a moment to stop its containers and unmount its layers.
  for _ in $(seq 1 30); do
    alive=
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.5
  done
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
  ip netns pids "$NS" 2>/dev/null | xargs -r kill -9 2>/dev/null
  ip link del "$VH" 2>/dev/null
  ip netns del "$NS" 2>/dev/null
  [ -n "$CREATED_USER" ] && userdel "$CREATED_USER" 2>/dev/null
  if [ -z "${BENCH_KEEP:-}" ]; then
    # dockerd's overlay mounts must be gone before the folder can be removed.
    umount -R "$WORK/docker" 2>/dev/null
    rm -rf "$WORK"
  else
    log "kept $WORK"
  fi
}
trap cleanup EXIT
trap 'log "compare.sh: failed at line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || die "run as root (network namespace, tc, dockerd)"

# --- prerequisites ----------------------------------------------------------
need=()
command -v rsync >/dev/null || need+=(rsync)
command -v ssh >/dev/null || need+=(openssh-client)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
for c in dockerd /usr/sbin/sshd ssh rsync ip tc busybox openssl rustc "$CLI"; do
  command -v "$c" >/dev/null || die "missing $c"
done

mkdir -p "$OUT"
log "building absconda (release)"
(cd "$ROOT" && cargo build --release --quiet)
ABSCONDA=$ROOT/target/release/absconda
rustc -O --edition 2021 "$ROOT/benches/tools/delay_proxy.rs" -o "$WORK/delay_proxy"

# --- the reference context ----------------------------------------------------
# 2,000 small source files in 50 folders, 20 incompressible 5 MiB files and
# one 100 MiB file that is half random, half text (about 216 MB). Pseudo-random
# bytes come from AES-CTR over zeros, so every run has the same content.
prng() { # key-byte size
  # (The writers of these pipes die of SIGPIPE by design.)
  { openssl enc -aes-128-ctr -nosalt -K "$(printf '%032x' "$1")" -iv 0 </dev/zero 2>/dev/null || true; } | head -c "$2"
}
gen_context() {
  local ctx=$1
  mkdir -p "$ctx"
  awk -v root="$ctx" 'BEGIN {
    srand(7)
    split("fn let match impl struct return self .into() (x) ; { } pub use // why", w, " ")
    for (d = 0; d < 50; d++) {
      dir = sprintf("%s/src/module_%02d", root, d)
      system("mkdir -p " dir)
      for (f = 0; f < 40; f++) {
        path = sprintf("%s/file_%03d.rs", dir, f)
        size = 512 + int(rand() * 7680); n = 0; line = ""
        while (n < size) { t = w[1 + int(rand() * 16)] " "; line = line t; n += length(t)
          if (length(line) > 70) { print line > path; line = "" } }
        print line > path; close(path)
      }
    }
  }'
  mkdir -p "$ctx/assets"
  for i in $(seq 1 20); do prng "$i" $((5 << 20)) > "$ctx/assets/blob_$i.bin"; done
  prng 99 $((50 << 20)) > "$WORK/r.tmp"
  { yes 'INFO 2026-11-20T10:00:00Z request handled in 12ms path=/api/v1/items status=200' || true; } |
    head -c $((50 << 20)) > "$WORK/t.tmp"
  for i in $(seq 0 99); do
    dd if="$WORK/r.tmp" bs=512K skip="$i" count=1 status=none
    dd if="$WORK/t.tmp" bs=512K skip="$i" count=1 status=none
  done > "$ctx/assets/dataset.bin"
  rm -f "$WORK/r.tmp" "$WORK/t.tmp"
  printf 'FROM local/busybox:latest\nCOPY . /app/\n' > "$ctx/Dockerfile"
}
log "generating the reference context"
gen_context "$WORK/ctx.orig"
CTX=$WORK/ctx
CTX_BYTES=$(du -sb "$WORK/ctx.orig" | cut -f1)

# --- the builder's user -------------------------------------------------------------
# Everything the builder side writes lives in $WORK/b, owned by that user.
chmod 755 "$WORK"
mkdir -p "$WORK/b"
if [ "$BUSER" != root ]; then
  if ! id "$BUSER" >/dev/null 2>&1; then
    useradd --system --user-group --shell /bin/sh --home-dir "$WORK/b" "$BUSER"
    CREATED_USER=$BUSER
    # Not locked (sshd without PAM refuses locked accounts), no password either.
    usermod -p '*' "$BUSER"
  fi
  chown "$BUSER:" "$WORK/b"
fi
BGROUP=$(id -gn "$BUSER")

# --- dockerd and a base image -------------------------------------------------
log "starting dockerd"
mkdir -p "$WORK/docker"
dockerd --group "$BGROUP" --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
  --data-root "$WORK/docker/data" --exec-root "$WORK/docker/exec" \
  --pidfile "$WORK/docker/pid" -H "unix://$WORK/d.sock" >"$WORK/dockerd.log" 2>&1 &
PIDS+=($!)
export DOCKER_HOST=unix://$WORK/d.sock
for _ in $(seq 1 60); do "$CLI" version >/dev/null 2>&1 && break; sleep 1; done
"$CLI" version >/dev/null || die "dockerd did not start: $(tail -5 "$WORK/dockerd.log")"
mkdir -p "$WORK/rootfs/bin" && cp /bin/busybox "$WORK/rootfs/bin/"
for c in sh ls cat echo; do ln -s busybox "$WORK/rootfs/bin/$c"; done
tar -C "$WORK/rootfs" -c . | "$CLI" import - local/busybox:latest >/dev/null

# --- sshd on loopback and in a namespace behind a shaped link ------------------
ssh-keygen -q -t ed25519 -N '' -C '' -f "$WORK/hostkey"
ssh-keygen -q -t ed25519 -N '' -C '' -f "$WORK/userkey"
cp "$WORK/userkey.pub" "$WORK/authorized_keys"
chmod 644 "$WORK/authorized_keys"
mkdir -p /run/sshd
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
  echo $((20000 + RANDOM % 20000)); }
LO_PORT=$(free_port)
NS_PORT=2222
sshd_config() { # listen port file
  cat > "$3" <<EOF
Port $2
ListenAddress $1
HostKey $WORK/hostkey
AuthorizedKeysFile $WORK/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PidFile $WORK/sshd-$2.pid
MaxStartups 50
MaxSessions 50
SetEnv DOCKER_HOST=unix://$WORK/d.sock DOCKER_BUILDKIT=1
EOF
}
sshd_config 127.0.0.1 "$LO_PORT" "$WORK/sshd-lo.conf"
/usr/sbin/sshd -D -e -f "$WORK/sshd-lo.conf" 2>"$WORK/sshd-lo.log" &
PIDS+=($!)

ip netns del "$NS" 2>/dev/null || true
ip link del "$VH" 2>/dev/null || true
ip netns add "$NS"
ip link add "$VH" type veth peer name "$VN"
ip link set "$VN" netns "$NS"
ip addr add "$HOST_IP/30" dev "$VH"
ip link set "$VH" up
ip netns exec "$NS" sh -c "ip addr add $NS_IP/30 dev $VN; ip link set $VN up; ip link set lo up"
tc qdisc add dev "$VH" root tbf rate "$RATE" burst 64kb latency 50ms
sshd_config "$NS_IP" "$NS_PORT" "$WORK/sshd-ns.conf"
ip netns exec "$NS" /usr/sbin/sshd -D -e -f "$WORK/sshd-ns.conf" 2>"$WORK/sshd-ns.log" &
PIDS+=($!)

# The 100 ms link: the loopback sshd behind the delay proxy, on the veth's
# host address (local traffic: not shaped by the slow link's tbf).
RTT_PORT=$(free_port)
"$WORK/delay_proxy" "$HOST_IP:$RTT_PORT" "127.0.0.1:$LO_PORT" $((RTT_MS / 2)) 2>"$WORK/delay_proxy.log" &
PIDS+=($!)

hostkey=$(cat "$WORK/hostkey.pub")
printf '[127.0.0.1]:%s %s\n[%s]:%s %s\n[%s]:%s %s\n' "$LO_PORT" "$hostkey" "$NS_IP" "$NS_PORT" "$hostkey" \
  "$HOST_IP" "$RTT_PORT" "$hostkey" > "$WORK/known_hosts"
cat > "$WORK/ssh_config" <<EOF
Host loopback
  HostName 127.0.0.1
  Port $LO_PORT
Host slow
  HostName $NS_IP
  Port $NS_PORT
Host rtt
  HostName $HOST_IP
  Port $RTT_PORT
Host *
  User $BUSER
  IdentityFile $WORK/userkey
  IdentitiesOnly yes
  UserKnownHostsFile $WORK/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
  LogLevel ERROR
EOF
# The docker CLI runs `ssh` from PATH with no way to pass -F.
mkdir -p "$WORK/bin"
printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$WORK/ssh_config" > "$WORK/bin/ssh"
chmod +x "$WORK/bin/ssh"
SSH=(/usr/bin/ssh -F "$WORK/ssh_config")
for l in loopback slow rtt; do
  for _ in $(seq 1 20); do "${SSH[@]}" "$l" true 2>/dev/null && break; sleep 0.5; done
  "${SSH[@]}" "$l" true || die "cannot reach sshd over $l"
done

cat > "$WORK/absconda-remote.yaml" <<EOF
builders:
  loopback:
    provider: ssh
    host: 127.0.0.1
    port: $LO_PORT
    user: $BUSER
    identity_file: $WORK/userkey
    known_hosts: $WORK/known_hosts
    workspace: $WORK/b/ws
    docker: $CLI
  slow:
    provider: ssh
    host: $NS_IP
    port: $NS_PORT
    user: $BUSER
    identity_file: $WORK/userkey
    known_hosts: $WORK/known_hosts
    workspace: $WORK/b/ws
    docker: $CLI
  rtt:
    provider: ssh
    host: $HOST_IP
    port: $RTT_PORT
    user: $BUSER
    identity_file: $WORK/userkey
    known_hosts: $WORK/known_hosts
    workspace: $WORK/b/ws
    docker: $CLI
defaults:
  timeout: 3600
EOF
mkdir -p "$WORK/home"

# --- methods --------------------------------------------------------------------
# Each prints the bytes it knows it sent (or nothing) on fd 3.
m_absconda() { # link tag
  env -i PATH=/usr/bin:/bin HOME="$WORK/home" XDG_CACHE_HOME="$WORK/cache" USER=bench \
    ${BENCH_RUST_LOG:+RUST_LOG=$BENCH_RUST_LOG} \
    ABSCONDA_REMOTE_CONFIG="$WORK/absconda-remote.yaml" \
    "$ABSCONDA" build --remote-builder "$1" --context "$CTX" --repository bench/absconda --tag "$2" --json \
    >"$WORK/last.json" 2>"$WORK/last.err" || { cat "$WORK/last.err" >&2; return 1; }
  sed -n 's/^  "bytes_sent": \([0-9]*\),*$/\1/p' "$WORK/last.json" >&3
  grep '^absconda: sent' "$WORK/last.err" >&2 || true
  cp "$WORK/last.err" "$OUT/absconda-$1-$2.log"
}
m_tarssh() {
  tar -C "$CTX" -cf - . | "${SSH[@]}" "$1" "$CLI" build -q -t "bench/tarssh:$2" - >/dev/null
}
m_dockerssh() {
  PATH="$WORK/bin:$PATH" DOCKER_HOST="ssh://$1" DOCKER_BUILDKIT=1 \
    "$CLI" build -q -t "bench/dockerssh:$2" "$CTX" >/dev/null
}
rsync_then_build() { # link tag flags
  rsync $3 --delete --stats -e "/usr/bin/ssh -F $WORK/ssh_config" "$CTX/" "$1:$WORK/b/rsync-$1/" |
    sed -n 's/^Total bytes sent: \([0-9,.]*\).*/\1/p' | tr -d ',.' >&3
  "${SSH[@]}" "$1" "$CLI" build -q -t "bench/rsync:$2" "$WORK/b/rsync-$1" >/dev/null
}
m_rsync() { rsync_then_build "$1" "$2" -a; }
m_rsyncz() { rsync_then_build "$1" "$2" -az; }

prune() {
  "$CLI" builder prune -af >/dev/null 2>&1 || true
  "$CLI" image ls --format '{{.Repository}}:{{.Tag}}' | grep '^bench/' | xargs -r "$CLI" image rm -f >/dev/null 2>&1 || true
  rm -rf "$WORK/b/ws/contexts" "$WORK/cache" "$WORK"/b/rsync-*
}

edit() { # case
  case $1 in
    big) prng 1234 $((5 << 20)) > "$CTX/assets/blob_7.bin" ;;
    small) printf '// edited by the benchmark\n' >> "$CTX/src/module_17/file_023.rs" ;;
  esac
}

tx_bytes() { cat "/sys/class/net/$VH/statistics/tx_bytes"; }

if [ -n "${BENCH_HOLD:-}" ]; then
  # For poking at the setup by hand: everything runs until the file goes.
  cp -a "$WORK/ctx.orig" "$CTX"
  touch "$WORK/hold"
  log "holding: WORK=$WORK DOCKER_HOST=$DOCKER_HOST ssh -F $WORK/ssh_config loopback|slow; rm $WORK/hold to go on"
  while [ -e "$WORK/hold" ]; do sleep 1; done
fi

RESULTS=$WORK/results.tsv
: > "$RESULTS"
run_one() { # link method case
  local link=$1 method=$2 case=$3 t0 t1 b0 b1 wire self
  b0=$(tx_bytes)
  t0=$(date +%s.%N)
  self=$( { "m_$method" "$link" "$case" 3>&1 >&2; } 2>&2 ) || die "$method failed on $link ($case)"
  t1=$(date +%s.%N)
  b1=$(tx_bytes)
  wire=$((b1 - b0))
  [ "$link" = slow ] || wire=
  printf '%s\t%s\t%s\t%.2f\t%s\t%s\n' "$link" "$case" "$method" "$(echo "$t1 - $t0" | bc -l)" "$wire" "${self:-}" >> "$RESULTS"
  log "$(printf '%-8s %-8s %-10s %6.2fs wire=%s self=%s' "$link" "$case" "$method" "$(echo "$t1 - $t0" | bc -l)" "${wire:--}" "${self:--}")"
}

command -v bc >/dev/null || die "missing bc"
# Runs go round the methods (rather than one method's runs in a row), so
# that load from elsewhere on the machine spreads over all of them.
for link in $LINKS; do
  runs=RUNS_$link
  for _ in $(seq 1 "${!runs}"); do
    for method in $METHODS; do
      [ "$method" = rsyncz ] && [ "$link" = loopback ] && continue
      rm -rf "$CTX" && cp -a "$WORK/ctx.orig" "$CTX"
      # absconda does not trust the stat of a file changed within 2 s of a
      # scan (it hashes it again next time); users rarely build that soon
      # after copying a whole tree, so let the copy settle.
      sleep 2
      for case in $CASES; do
        case $case in
          cold) prune ;;
          *) edit "$case" ;;
        esac
        run_one "$link" "$method" "$case"
      done
    done
  done
done

# --- peak RSS while syncing a 2 GiB context ---------------------------------------
if [ -n "${BENCH_RSS:-}" ]; then
  log "peak RSS: syncing a 2 GiB context (1,024 files of 2 MiB)"
  big=$WORK/ctx2g
  mkdir -p "$big/data"
  for i in $(seq 0 1023); do prng $((1000 + i)) $((2 << 20)) > "$big/data/f_$i.bin"; done
  printf 'FROM local/busybox:latest\nLABEL context=2GiB\n' > "$big/Dockerfile"
  prune
  for run in cold nochange; do
    env -i PATH=/usr/bin:/bin HOME="$WORK/home" XDG_CACHE_HOME="$WORK/cache" USER=bench \
      ABSCONDA_REMOTE_CONFIG="$WORK/absconda-remote.yaml" \
      /usr/bin/time -v "$ABSCONDA" build --remote-builder loopback --context "$big" \
      --repository bench/rss --tag "$run" --json >"$WORK/rss.json" 2>"$WORK/rss.err"
    rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$WORK/rss.err")
    printf 'rss\t%s\t%s kB\n' "$run" "$rss" >> "$RESULTS"
    log "2 GiB context, $run: peak RSS $rss kB"
  done
  rm -rf "$big"
fi

# --- the table ----------------------------------------------------------------------
awk -F'\t' -v ctx="$CTX_BYTES" -v runs="loopback $RUNS_loopback, slow $RUNS_slow, rtt $RUNS_rtt" '
  $1 == "rss" { rss[$2] = $3; next }
  { key = $1 SUBSEP $2
    k = key SUBSEP $3; n_[k]++; t[k, n_[k]] = $4; w[k, n_[k]] = $5; s[k, n_[k]] = $6
    has[k] = 1
    if (!(key in seen)) { seen[key] = 1; order[++n] = key } }
  function median(arr, k, cnt,   i, j, v, tmp, m) {
    m = 0
    for (i = 1; i <= cnt; i++) if (arr[k, i] != "") { m++; v[m] = arr[k, i] + 0 }
    if (m == 0) return ""
    for (i = 2; i <= m; i++) { tmp = v[i]; for (j = i - 1; j >= 1 && v[j] > tmp; j--) v[j + 1] = v[j]; v[j + 1] = tmp }
    return (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
  }
  function mb(b) { return b == "" ? "-" : (b < 1e5 ? sprintf("%.1f KB", b / 1e3) : sprintf("%.1f MB", b / 1e6)) }
  function sec(x) { return x == "" ? "-" : sprintf("%.2f", x) }
  END {
    printf "Context: %.1f MB. Median wall time in seconds over runs (%s). Bytes: client to builder,\n", ctx / 1e6, runs
    printf "counted on the shaped link (TCP payload and headers, SSH handshake included) or, on loopback, as the tool reports them.\n\n"
    printf "| link | case | absconda | tar \\| ssh | DOCKER_HOST=ssh:// | rsync -a + ssh | rsync -az + ssh | absconda / best of the three | bytes: absconda | bytes: tar \\| ssh | bytes: DOCKER_HOST | bytes: rsync -a | bytes: rsync -az |\n"
    printf "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    split("absconda tarssh dockerssh rsync rsyncz", m, " ")
    for (i = 1; i <= n; i++) {
      key = order[i]; split(key, kv, SUBSEP)
      best = ""; bestm = ""
      for (j = 1; j <= 5; j++) {
        k = key SUBSEP m[j]
        med[j] = (k in has) ? median(t, k, n_[k]) : ""
        by[j] = (k in has) ? median(w, k, n_[k]) : ""
        if (by[j] == "" && (k in has)) by[j] = median(s, k, n_[k])
        # "Best other": tar|ssh, DOCKER_HOST, rsync -a (rsync -az is shown apart).
        if (j >= 2 && j <= 4 && med[j] != "" && (best == "" || med[j] < best)) { best = med[j]; bestm = m[j] }
      }
      row = sprintf("| %s | %s |", kv[1], kv[2])
      for (j = 1; j <= 5; j++) row = row sprintf(" %s |", sec(med[j]))
      ratio = (best != "" && best > 0 && med[1] != "") ? sprintf("%.2f (vs %s)", med[1] / best, bestm) : "-"
      printf "%s %s | %s | %s | %s | %s | %s |\n", row, ratio, mb(by[1]), mb(by[2]), mb(by[3]), mb(by[4]), mb(by[5])
    }
    for (r in rss) printf "\nPeak RSS of absconda syncing a 2 GiB context (%s): %s\n", r, rss[r]
  }' "$RESULTS" | tee "$WORK/table.md"
cp "$RESULTS" "$OUT/results.tsv"
cp "$WORK/table.md" "$OUT/table.md"
log "results in $OUT"

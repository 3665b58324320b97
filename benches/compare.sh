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
#   - docker build ctx run on the builder host itself (`floor`: no transfer,
#     no ssh; the lower bound of anything that ends in docker build)
# in four cases (cold with the build cache pruned, no change, one 5 MiB file
# changed, one small file changed), and on request three fresh-runner cases
# (see below), over three links: loopback, a 50 Mbit/s
# tbf-shaped veth into a network namespace where a second sshd runs, and a
# 100 ms round trip (benches/tools/delay_proxy.rs in front of the loopback
# sshd, 50 ms each way; it listens on the veth's host address, so absconda
# treats it as the remote link it stands for). It sets up its own dockerd,
# sshds and namespace and tears them down on exit.
#
# Fresh runners (a CI job on a new machine: the builder and its workspace
# stay, the checkout's path and absconda's local cache are new):
#   fresh       the context, once built by the method, copied with `cp -a`
#               (same mtimes) to a new path and built from there with an empty
#               local cache ($XDG_CACHE_HOME); the other methods build the same
#               new path (rsync into its usual fixed remote folder, which a
#               runner can only reuse because the path on the builder is fixed)
#   freshclone  the same, but every file and folder gets a new mtime, as a
#               git clone would give it
#   copies10    absconda only, in a workspace of its own: ten fresh runners
#               (cp -a) build the same context; `du -sk` of that workspace
#               after the first and after the tenth, then the same with ten
#               fresh clones (new mtimes each)
#
# Usage: benches/compare.sh            (about 10-15 minutes)
#   BENCH_LINKS="loopback slow rtt"  BENCH_CASES="cold nochange big small"
#     (more: fresh freshclone copies10; a fresh runner's case builds the
#     context first if the method has not built it yet in its sequence)
#   BENCH_METHODS="absconda tarssh dockerssh rsync rsyncz floor abstream"  BENCH_RSS=1 (2 GiB RSS run)
#   BENCH_RUNS_LOOPBACK=3 BENCH_RUNS_SLOW=1 BENCH_RUNS_RTT=1  BENCH_RTT_MS=100
#   BENCH_SCALE=1 (N > 1 divides the reference context's and the RSS run's
#     file counts and sizes by N, for a quick check of the script itself)
#   BENCH_RUST_LOG=absconda=debug
#   BENCH_OUT=target/bench-compare (results)  BENCH_KEEP=1 keeps the work folder.  Must run as root (netns, tc, dockerd).
#
# Bytes client to builder are counted by the kernel: on the slow link as the
# veth's tx_bytes, on loopback and the rtt link by an iptables chain of its
# own (ABSB-<pid>, removed on exit) that counts the packets to the sshd's or
# the delay proxy's port (IP and TCP headers included, no Ethernet header).
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
METHODS=${BENCH_METHODS-"absconda tarssh dockerssh rsync rsyncz floor abstream"}
SCALE=${BENCH_SCALE:-1}
case $SCALE in ''|*[!0-9]*|0) echo "compare.sh: BENCH_SCALE must be a positive whole number" >&2; exit 2 ;; esac
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
# The iptables chain counting bytes on loopback and the rtt link.
CHAIN=ABSB-$$
CHAIN_SET=

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
  if [ -n "$CHAIN_SET" ]; then
    iptables -w -D OUTPUT -j "$CHAIN" 2>/dev/null
    iptables -w -F "$CHAIN" 2>/dev/null
    iptables -w -X "$CHAIN" 2>/dev/null
  fi
  ip link del "$VH" 2>/dev/null
  ip netns del "$NS" 2>/dev/null
  if [ -n "$CREATED_USER" ]; then
    # userdel refuses while a process of the user lives (a session ending).
    for _ in $(seq 1 20); do userdel "$CREATED_USER" 2>/dev/null && break; sleep 0.5; done
  fi
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
# BENCH_SCALE divides the counts (folders, 5 MiB files, 512 KiB halves).
atleast1() { if [ "$1" -ge 1 ]; then echo "$1"; else echo 1; fi; }
DIRS=$(atleast1 $((50 / SCALE)))
BLOBS=$(atleast1 $((20 / SCALE)))
HALVES=$(atleast1 $((100 / SCALE)))
gen_context() {
  local ctx=$1
  mkdir -p "$ctx"
  awk -v root="$ctx" -v dirs="$DIRS" 'BEGIN {
    srand(7)
    split("fn let match impl struct return self .into() (x) ; { } pub use // why", w, " ")
    for (d = 0; d < dirs; d++) {
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
  for i in $(seq 1 "$BLOBS"); do prng "$i" $((5 << 20)) > "$ctx/assets/blob_$i.bin"; done
  prng 99 $((HALVES << 19)) > "$WORK/r.tmp"
  { yes 'INFO 2026-11-20T10:00:00Z request handled in 12ms path=/api/v1/items status=200' || true; } |
    head -c $((HALVES << 19)) > "$WORK/t.tmp"
  for i in $(seq 0 $((HALVES - 1))); do
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

# Bytes on loopback and the rtt link: a chain of the bench's own counts the
# packets to the loopback sshd's and the delay proxy's ports (only the
# bench talks to them). Without iptables those links show the tools' own
# counts, as absconda's --json and rsync's --stats report them.
if iptables -w -N "$CHAIN" 2>/dev/null; then
  CHAIN_SET=1
  iptables -w -A "$CHAIN" -p tcp -d 127.0.0.1 --dport "$LO_PORT"
  iptables -w -A "$CHAIN" -p tcp -d "$HOST_IP" --dport "$RTT_PORT"
  iptables -w -I OUTPUT -j "$CHAIN"
else
  log "no iptables: bytes on loopback and rtt are what the tools report"
fi
chain_bytes() { # port
  iptables -w -nvxL "$CHAIN" | awk -v p="dpt:$1" '$NF == p { print $2; exit }'
}
wire_bytes() { # link: bytes sent towards the builder so far (nothing: not counted)
  case $1 in
    slow) cat "/sys/class/net/$VH/statistics/tx_bytes" ;;
    loopback) if [ -n "$CHAIN_SET" ]; then chain_bytes "$LO_PORT"; fi ;;
    rtt) if [ -n "$CHAIN_SET" ]; then chain_bytes "$RTT_PORT"; fi ;;
  esac
}

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
EOF
# copies10's builders: the same sshds, a workspace of their own.
for l in loopback slow rtt; do
  sed -n "/^  $l:\$/,/^    docker:/p" "$WORK/absconda-remote.yaml" |
    sed -e "s|^  $l:\$|  $l-iso:|" -e "s|workspace: .*|workspace: $WORK/b/wsi|"
done > "$WORK/iso.yaml"
cat "$WORK/iso.yaml" >> "$WORK/absconda-remote.yaml"
# abstream's builders: the same, with cold sends streamed into docker build.
for l in loopback slow rtt; do
  sed -n "/^  $l:\$/,/^    docker:/p" "$WORK/absconda-remote.yaml" |
    sed -e "s|^  $l:\$|  $l-stream:|" -e "s|^    docker: \(.*\)|    docker: \1\n    stream_cold: true|"
done >> "$WORK/absconda-remote.yaml"
cat >> "$WORK/absconda-remote.yaml" <<EOF
defaults:
  timeout: 3600
EOF
mkdir -p "$WORK/home"

# --- methods --------------------------------------------------------------------
# The checkout every method builds, and absconda's local cache (its
# XDG_CACHE_HOME: the hashes it remembers, the manifest of the builder's
# copy, its installation id). A fresh runner's case points both elsewhere.
CTX=$WORK/ctx
CACHE=$WORK/cache
# Set by copies10: absconda builds on "<link>-iso", a workspace of its own.
ISO=
# Each prints the bytes it knows it sent (or nothing) on fd 3.
m_absconda() { # link tag
  env -i PATH=/usr/bin:/bin HOME="$WORK/home" XDG_CACHE_HOME="$CACHE" USER=bench \
    ${BENCH_RUST_LOG:+RUST_LOG=$BENCH_RUST_LOG} \
    ABSCONDA_REMOTE_CONFIG="$WORK/absconda-remote.yaml" \
    "$ABSCONDA" build --remote-builder "$1${ISO:+-iso}${STREAM:+-stream}" --context "$CTX" --repository bench/absconda --tag "$2" --json \
    >"$WORK/last.json" 2>"$WORK/last.err" || { cat "$WORK/last.err" >&2; return 1; }
  sed -n 's/^  "bytes_sent": \([0-9]*\),*$/\1/p' "$WORK/last.json" >&3
  grep '^absconda: sent' "$WORK/last.err" >&2 || true
  cp "$WORK/last.err" "$OUT/absconda-$1-$2.log"
}
# absconda with `stream_cold: true`: a cold send goes into docker build as
# it arrives (its layers are not reused by later builds from the copy).
m_abstream() { STREAM=1 m_absconda "$@"; }
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
# The floor: docker build on the builder host, on a folder that already holds
# the context (this machine is the builder): no transfer, no ssh.
m_floor() {
  DOCKER_BUILDKIT=1 "$CLI" build -q -t "bench/floor:$2" "$CTX" >/dev/null
}

prune() {
  "$CLI" builder prune -af >/dev/null 2>&1 || true
  "$CLI" image ls --format '{{.Repository}}:{{.Tag}}' | grep '^bench/' | xargs -r "$CLI" image rm -f >/dev/null 2>&1 || true
  # The content store too: a cold builder has seen nothing.
  rm -rf "$WORK/b/ws/contexts" "$WORK/b/ws/store" "$WORK/b/wsi" "$WORK/cache" "$WORK"/b/rsync-*
}

# A fresh CI runner: the context at a new path (cp -a keeps the mtimes; a
# clone gives every file and folder a new one) and an empty local cache.
FRESH_N=0
fresh_runner() { # fresh|freshclone
  FRESH_N=$((FRESH_N + 1))
  local dir=$WORK/fresh/$FRESH_N
  mkdir -p "$dir"
  cp -a "$WORK/ctx" "$dir/ctx"
  if [ "$1" = freshclone ]; then find "$dir/ctx" -exec touch {} +; fi
  CTX=$dir/ctx
  CACHE=$dir/cache
}
fresh_done() { # the runner goes away
  rm -rf "$WORK/fresh/$FRESH_N"
  CTX=$WORK/ctx
  CACHE=$WORK/cache
}

edit() { # case
  case $1 in
    big) prng 1234 $((5 << 20)) > "$CTX/assets/blob_7.bin" ;;
    small) printf '// edited by the benchmark\n' >> "$CTX/src/module_$(printf %02d $((17 % DIRS)))/file_023.rs" ;;
  esac
}

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
  local link=$1 method=$2 case=$3 t0 t1 b0 b1 wire='' self
  b0=$(wire_bytes "$link")
  t0=$(date +%s.%N)
  self=$( { "m_$method" "$link" "$case" 3>&1 >&2; } 2>&2 ) || die "$method failed on $link ($case)"
  t1=$(date +%s.%N)
  b1=$(wire_bytes "$link")
  if [ -n "$b0" ] && [ -n "$b1" ]; then wire=$((b1 - b0)); fi
  printf '%s\t%s\t%s\t%.2f\t%s\t%s\n' "$link" "$case" "$method" "$(echo "$t1 - $t0" | bc -l)" "$wire" "${self:-}" >> "$RESULTS"
  log "$(printf '%-8s %-14s %-10s %6.2fs wire=%s self=%s' "$link" "$case" "$method" "$(echo "$t1 - $t0" | bc -l)" "${wire:--}" "${self:--}")"
  if [ "$method" = absconda ] && [ "$CACHE" != "$WORK/cache" ]; then absconda_info "$link" "$case"; fi
}
# For information only (the table's numbers are measured from outside):
# what absconda's --json says about a fresh runner's build, and the size of
# the local cache it wrote (the context's file list with hashes, the
# manifest of the builder's copy).
absconda_info() { # link case
  local k v
  for k in scan_seconds hashed_bytes query_bytes blobs_sent; do
    v=$(sed -n "s/^ *\"$k\": \([0-9.e+-]*\),*\$/\1/p" "$WORK/last.json" | head -1)
    printf 'info\t%s\t%s\t%s\t%s\n' "$1" "$2" "$k" "$v" >> "$RESULTS"
  done
  printf 'info\t%s\t%s\tcache_bytes\t%s\n' "$1" "$2" "$(du -sb "$CACHE" | cut -f1)" >> "$RESULTS"
}

# copies10: ten fresh runners build the same context on a workspace of
# their own; the disk it takes after the first and after the tenth. Then
# the same with ten fresh clones (new mtimes each).
copies10() { # link
  local kind n first
  ISO=1
  for kind in copies10 copies10clone; do
    rm -rf "$WORK/b/wsi"
    for n in $(seq 1 10); do
      if [ "$kind" = copies10 ]; then fresh_runner fresh; else fresh_runner freshclone; fi
      # The first runner finds the workspace empty; the median of the other
      # nine is the case's time.
      if [ "$n" = 1 ]; then first=-first; else first=; fi
      run_one "$1" absconda "$kind$first"
      fresh_done
      if [ "$n" = 1 ] || [ "$n" = 10 ]; then
        printf 'du\t%s\t%s\t%s\t%s\n' "$1" "$kind" "$n" "$(du -sk "$WORK/b/wsi" | cut -f1)" >> "$RESULTS"
        log "$(du -sk "$WORK/b/wsi/store" "$WORK/b/wsi/contexts" | tr '\n\t' '  ')after $n runner(s) ($kind)"
      fi
    done
  done
  rm -rf "$WORK/b/wsi"
  ISO=
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
      built=
      for case in $CASES; do
        case $case in
          cold) prune ;;
          fresh | freshclone)
            # A fresh runner comes after the context was built once.
            if [ -z "$built" ]; then
              { "m_$method" "$link" first 3>/dev/null; } || die "$method failed on $link (first build)"
            fi
            fresh_runner "$case"
            ;;
          copies10)
            if [ "$method" = absconda ]; then copies10 "$link"; fi
            continue
            ;;
          *) edit "$case" ;;
        esac
        run_one "$link" "$method" "$case"
        built=1
        case $case in fresh | freshclone) fresh_done ;; esac
      done
    done
  done
done

# --- peak RSS while syncing a 2 GiB context ---------------------------------------
# cold and nochange from one checkout, then a fresh runner: the checkout
# copied to a new path (cp -a) with an empty local cache, on the builder
# whose store holds the content. Peak RSS as /usr/bin/time -v sees it.
if [ -n "${BENCH_RSS:-}" ]; then
  RSS_FILES=$(atleast1 $((1024 / SCALE)))
  RSS_MB=$((RSS_FILES * 2))
  log "peak RSS: syncing a $RSS_MB MiB context ($RSS_FILES files of 2 MiB)"
  big=$WORK/ctx2g
  mkdir -p "$big/data"
  for i in $(seq 0 $((RSS_FILES - 1))); do prng $((1000 + i)) $((2 << 20)) > "$big/data/f_$i.bin"; done
  printf 'FROM local/busybox:latest\nLABEL context=2GiB\n' > "$big/Dockerfile"
  prune
  for run in cold nochange fresh; do
    dir=$big
    cache=$WORK/cache
    if [ "$run" = fresh ]; then
      cp -a "$big" "$WORK/ctx2g-fresh"
      dir=$WORK/ctx2g-fresh
      cache=$WORK/cache-rss-fresh
    fi
    b0=$(wire_bytes loopback)
    t0=$(date +%s.%N)
    env -i PATH=/usr/bin:/bin HOME="$WORK/home" XDG_CACHE_HOME="$cache" USER=bench \
      ABSCONDA_REMOTE_CONFIG="$WORK/absconda-remote.yaml" \
      /usr/bin/time -v "$ABSCONDA" build --remote-builder loopback --context "$dir" \
      --repository bench/rss --tag "$run" --json >"$WORK/rss.json" 2>"$WORK/rss.err" ||
      die "the $RSS_MB MiB build failed ($run): $(tail -5 "$WORK/rss.err")"
    t1=$(date +%s.%N)
    b1=$(wire_bytes loopback)
    wire=
    if [ -n "$b0" ] && [ -n "$b1" ]; then wire=$((b1 - b0)); fi
    rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$WORK/rss.err")
    secs=$(printf '%.2f' "$(echo "$t1 - $t0" | bc -l)")
    printf 'rss\t%s\t%s\t%s\t%s\t%s\n' "$run" "$rss" "$secs" "$wire" "$RSS_MB" >> "$RESULTS"
    log "$RSS_MB MiB context, $run: peak RSS $rss kB, $secs s, wire ${wire:--} bytes"
    if [ "$run" = fresh ]; then rm -rf "$WORK/ctx2g-fresh" "$WORK/cache-rss-fresh"; fi
  done
  rm -rf "$big"
fi

# --- the table ----------------------------------------------------------------------
awk -F'\t' -v ctx="$CTX_BYTES" -v runs="loopback $RUNS_loopback, slow $RUNS_slow, rtt $RUNS_rtt" '
  $1 == "rss" { rss[$2] = $3; rsst[$2] = $4; rssw[$2] = $5; rssmb = $6; next }
  $1 == "info" { info[$2, $3, $4] = $5; if (!(($2, $3) in iseen)) { iseen[$2, $3] = 1; iorder[++ni] = $2 SUBSEP $3 }; next }
  $1 == "du" { du[$2, $3, $4] = $5; if (!(($2, $3) in dseen)) { dseen[$2, $3] = 1; dorder[++nd] = $2 SUBSEP $3 }; next }
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
    printf "Context: %.1f MB. Median wall time in seconds over runs (%s). Bytes: client to builder, counted by\n", ctx / 1e6, runs
    printf "the kernel (slow: the veth, Ethernet, IP and TCP headers included; loopback and rtt: an iptables counter on\n"
    printf "the sshd or proxy port, IP and TCP headers included; SSH handshake included), or where no counter ran, as the tool reports them.\n"
    printf "floor: docker build on the builder host itself, on a folder that holds the context (no transfer, no ssh).\n"
    printf "fresh / freshclone: a new checkout path (cp -a / new mtimes) and an empty local cache, after a first build;\n"
    printf "rsync uses its usual fixed remote folder. copies10*: absconda, ten fresh runners on a workspace of their own\n"
    printf "(-first: the first of them; copies10, copies10clone: median of the other nine).\n\n"
    printf "abstream: absconda with stream_cold: true (a cold send goes into docker build as it arrives).\n\n"
    printf "| link | case | absconda | tar \\| ssh | DOCKER_HOST=ssh:// | rsync -a + ssh | rsync -az + ssh | floor (docker build on the builder) | abstream | absconda / best of the three | bytes: absconda | bytes: tar \\| ssh | bytes: DOCKER_HOST | bytes: rsync -a | bytes: rsync -az |\n"
    printf "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    split("absconda tarssh dockerssh rsync rsyncz floor abstream", m, " ")
    for (i = 1; i <= n; i++) {
      key = order[i]; split(key, kv, SUBSEP)
      best = ""; bestm = ""
      for (j = 1; j <= 7; j++) {
        k = key SUBSEP m[j]
        med[j] = (k in has) ? median(t, k, n_[k]) : ""
        by[j] = (k in has) ? median(w, k, n_[k]) : ""
        if (by[j] == "" && (k in has)) by[j] = median(s, k, n_[k])
        # "Best other": tar|ssh, DOCKER_HOST, rsync -a (rsync -az is shown apart).
        if (j >= 2 && j <= 4 && med[j] != "" && (best == "" || med[j] < best)) { best = med[j]; bestm = m[j] }
      }
      row = sprintf("| %s | %s |", kv[1], kv[2])
      for (j = 1; j <= 7; j++) row = row sprintf(" %s |", sec(med[j]))
      ratio = (best != "" && best > 0 && med[1] != "") ? sprintf("%.2f (vs %s)", med[1] / best, bestm) : "-"
      printf "%s %s | %s | %s | %s | %s | %s |\n", row, ratio, mb(by[1]), mb(by[2]), mb(by[3]), mb(by[4]), mb(by[5])
    }
    if (nd > 0) {
      printf "\nDisk of the builder'"'"'s absconda workspace (du -sk: store plus copies) after the first and the tenth fresh runner:\n\n"
      printf "| link | runners | after 1 | after 10 | 10 / 1 |\n|---|---|---|---|---|\n"
      for (i = 1; i <= nd; i++) {
        split(dorder[i], kv, SUBSEP); a = du[kv[1], kv[2], 1]; b = du[kv[1], kv[2], 10]
        what = (kv[2] == "copies10") ? "ten cp -a copies (same mtimes)" : "ten clones (new mtimes)"
        ratio = (a > 0) ? sprintf("%.2f", b / a) : "-"
        printf "| %s | %s | %d kB | %d kB | %s |\n", kv[1], what, a, b, ratio
      }
    }
    if (ni > 0) {
      printf "\nFor information, from absconda'"'"'s own --json report (not measured from outside): local hashing time\n"
      printf "(scan_seconds), bytes hashed, the store query, content files sent; and the local cache folder it wrote (du -sb).\n\n"
      printf "| link | case | scan s | hashed | store query | files sent | local cache |\n|---|---|---|---|---|---|---|\n"
      for (i = 1; i <= ni; i++) {
        split(iorder[i], kv, SUBSEP); l = kv[1]; c = kv[2]
        printf "| %s | %s | %s | %s | %s | %s | %s |\n", l, c, sec(info[l, c, "scan_seconds"]), mb(info[l, c, "hashed_bytes"]),
          mb(info[l, c, "query_bytes"]), info[l, c, "blobs_sent"] == "" ? "-" : info[l, c, "blobs_sent"], mb(info[l, c, "cache_bytes"])
      }
    }
    split("cold nochange fresh", rr, " ")
    for (i = 1; i <= 3; i++) if (rr[i] in rss)
      printf "\nPeak RSS of absconda syncing a %s MiB context (%s, loopback): %s kB; %.2f s, %s on the wire\n", rssmb, rr[i], rss[rr[i]], rsst[rr[i]], mb(rssw[rr[i]])
  }' "$RESULTS" | tee "$WORK/table.md"
cp "$RESULTS" "$OUT/results.tsv"
cp "$WORK/table.md" "$OUT/table.md"
log "results in $OUT"

//! The small POSIX sh programs absconda runs on a builder.
//!
//! A builder may be a stock Ubuntu, Debian or Container-Optimized OS VM with
//! only sh, coreutils, tar, flock and docker: no helper binary is installed
//! there. Each script is a constant passed as `sh -c SCRIPT NAME ARGS…` with
//! every argument quoted by [`crate::shell`], so user data never becomes part
//! of the script text.
//!
//! The lease script is the supervisor of a build. It takes an exclusive
//! `flock` on `<workspace>/.lease`, creates the run folder, and then waits
//! for its stdin to close — which happens when absconda finishes, when the
//! user presses Ctrl-C, or when the connection dies. Whatever the cause it
//! then kills the build's process group, removes the run folder (with the
//! temporary docker config in it) and releases the lease. So cleanup does not
//! depend on the client surviving. absconda sends it a line every
//! [`LEASE_HEARTBEAT`]; after 45s of silence it cleans up the same way, so a
//! client that vanished without closing TCP holds the builder for under a
//! minute. Its protocol lines start with a nonce the script makes and says
//! first, so no builder-side text can forge one.

use std::time::Duration;

use crate::shell;

/// Exit status of the lease script when `--remote-wait` ran out.
pub const LEASE_TIMEOUT_STATUS: u32 = 75;
/// Exit status of a script that could not set up the workspace.
pub const WORKSPACE_STATUS: u32 = 70;
/// How often absconda tells the lease supervisor it is still there; the
/// supervisor gives up after 45s without a word.
pub const LEASE_HEARTBEAT: Duration = Duration::from_secs(10);

const LEASE: &str = r#"
ws=$1 run=$2 holder=$3 wait=$4 stop_delay=$5 poweroff=$6 identity=$7 metadata=$8
SELF_STOP=$9
umask 077
trap '' HUP PIPE
# Every protocol line starts with this build's nonce, made here and said
# first (so absconda need not send one, which would cost a round trip: sshd
# opens a session's input only once the command runs): no text from the
# builder (the holder file, a user name) can pass for a protocol line, as
# none of it could know the nonce. Holder text is cut to printable ASCII on
# one line.
nonce=$(tr -d '-' < /proc/sys/kernel/random/uuid 2>/dev/null)$(tr -d '-' < /proc/sys/kernel/random/uuid 2>/dev/null)
case $nonce in
  *[!0-9a-f]*|'') echo "error cannot read /proc/sys/kernel/random/uuid for a nonce" >&2; exit 70 ;;
esac
printf 'nonce %s\n' "$nonce"
say() { printf '%s %s\n' "$nonce" "$*"; }
holder_now() { tr -cd '\040-\176' < "$ws/.lease-holder" 2>/dev/null | cut -c1-200; }
if ! mkdir -p "$ws/runs" 2>/dev/null || ! [ -w "$ws" ]; then
  echo "error cannot create or write the workspace $ws as $(id -un)" >&2
  exit 70
fi
exec 9>>"$ws/.lease" || exit 70
# Builds waiting for the lease queue first come, first served: each takes a
# ticket, the next number of this workspace's queue, and only the first live
# ticket tries the lock (flock alone wakes waiters in no particular order).
# A ticket is live while its lease script runs; those of waiters that were
# killed or lived before a reboot are dropped. `--remote-off` and
# `remote status` read the tickets too.
live() { tr '\000' '\n' < "/proc/$1/cmdline" 2>/dev/null | grep -qx absconda-lease; }
queued() { # prints how many live tickets sort before $1 (all of them for "")
  k=0
  for t in "$ws"/.waiters/*; do
    [ -f "$t" ] || continue
    [ "${t##*/}" = "$1" ] && break
    if live "${t##*-}"; then k=$((k + 1)); else rm -f "$t"; fi
  done
  echo "$k"
}
if [ "$(queued "")" -gt 0 ] || ! flock -n 9; then
  if ! [ "$wait" -gt 0 ] 2>/dev/null; then
    say timeout "$(holder_now)"
    exit 75
  fi
  mkdir -p "$ws/.waiters" || exit 70
  exec 7>>"$ws/.queue-lock" && flock 7 || exit 70
  n=$(cat "$ws/.queue-seq" 2>/dev/null)
  case $n in ''|*[!0-9]*) n=0 ;; esac
  n=$((n + 1))
  echo "$n" > "$ws/.queue-seq"
  exec 7>&-
  ticket=$(printf '%012d-%s' "$n" "$$")
  printf '%s %s\n' "$(date +%s)" "$holder" | tr -cd '\040-\176\n' | cut -c1-220 > "$ws/.waiters/$ticket"
  trap 'rm -f "$ws/.waiters/$ticket"' EXIT
  say busy "$(holder_now)"
  start=$(date +%s) pos=
  while :; do
    ahead=$(queued "$ticket")
    if [ "$ahead" != "$pos" ]; then
      pos=$ahead
      say queue "$pos" || exit 1
    fi
    if [ "$ahead" -eq 0 ]; then
      flock -w 2 9 && break
    else
      sleep 1
    fi
    if [ $(( $(date +%s) - start )) -ge "$wait" ]; then
      say timeout "$(holder_now)"
      exit 75
    fi
    say waiting "$(holder_now)" || exit 1
  done
  rm -f "$ws/.waiters/$ticket"
  trap - EXIT
fi
# A build arriving cancels a pending self-stop by removing its token (the
# self-stop checks it under the lease): no process is ever signalled, so a
# stale or forged file cannot aim a kill at another process.
rm -f "$ws/.stop-token" "$ws/.stop-pid"
rm -f "$ws/.lease-holder"
printf '%s' "$holder" | tr -cd '\040-\176' | cut -c1-200 > "$ws/.lease-holder"
# Run folders here belong to no live lease (this one holds it, and has not
# made its own yet): a supervisor that was killed or a reboot left them,
# maybe with a registry login in .docker/config.json. Stop what still runs
# there (only the process that recorded itself and still works in that
# folder) and remove them.
for old in "$ws"/runs/*; do
  if [ -L "$old" ]; then rm -f "$old"; continue; fi
  [ -d "$old" ] || continue
  pid=$(cat "$old/pid" 2>/dev/null)
  case $pid in
    ''|*[!0-9]*) ;;
    *) if [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$(cd "$old" && pwd -P)" ]; then
         kill -KILL -"$pid" 2>/dev/null
       fi ;;
  esac
  rm -rf "$old" 2>/dev/null || { chmod -R u+rwx "$old"; rm -rf "$old"; }
done
# Secrets folders of builds whose supervisor was killed (see SECRETS): each
# record names `<tmpfs>/absconda-<uid>/<run id>`; anything else is not ours.
for f in "$ws"/.secrets/*; do
  [ -f "$f" ] || continue
  d=$(cat "$f")
  case $d in
    /*/absconda-*/"${f##*/}") [ -d "$d" ] && [ ! -L "$d" ] && rm -rf "$d" ;;
  esac
  rm -f "$f"
done
if ! mkdir "$run"; then
  echo "error cannot create the run folder $run" >&2
  exit 70
fi
say acquired
# Hold the lease until the client closes stdin or disappears, or goes
# silent: it sends a line every few seconds, and a client that sent none
# for 45s (a laptop off the network, TCP not yet broken; a stopped
# process) is given up on, so the lease is free within a minute.
exec 3<&0
( while IFS= read -r line; do : > "$run/.beat" 2>/dev/null; done ) <&3 9>&- &
reader=$!
( n=0
  while kill -0 "$reader" 2>/dev/null; do
    sleep 5
    if [ -e "$run/.beat" ]; then rm -f "$run/.beat"; n=0; else n=$((n + 5)); fi
    if [ "$n" -ge 45 ]; then kill "$reader" 2>/dev/null; exit 0; fi
  done ) </dev/null 9>&- &
watch=$!
wait "$reader"
kill "$watch" 2>/dev/null
exec 3<&-
if [ -s "$run/pid" ]; then
  pid=$(cat "$run/pid")
  kill -TERM -"$pid" 2>/dev/null
  n=0
  while kill -0 -"$pid" 2>/dev/null && [ $n -lt 20 ]; do sleep 0.5; n=$((n + 1)); done
  kill -KILL -"$pid" 2>/dev/null
fi
sec=$ws/.secrets/${run##*/}
if [ -f "$sec" ]; then
  d=$(cat "$sec")
  case $d in
    /*/absconda-*/"${run##*/}") [ -d "$d" ] && [ ! -L "$d" ] && rm -rf "$d" ;;
  esac
  rm -f "$sec"
fi
rm -rf "$run"
rm -f "$ws/.lease-holder"
: > "$ws/.lease-holder"
touch "$ws/.last-used"
if [ "$stop_delay" -ge 0 ] 2>/dev/null && [ -n "$poweroff" ]; then
  token="$$-$(date +%s)"
  rm -f "$ws/.stop-token"
  printf '%s\n' "$token" > "$ws/.stop-token"
  sh -c "$SELF_STOP" absconda-self-stop "$ws" "$stop_delay" "$poweroff" "$identity" "$metadata" \
    "$token" 9>&- </dev/null >/dev/null 2>&1 &
fi
say released
"#;

/// Powers the builder off after `delay` seconds unless a build took the
/// lease meanwhile, and only on the instance it was scheduled for: the
/// metadata server must confirm the project, zone and instance name (GCE)
/// or the instance id (EC2). When it
/// cannot be proven — no curl or wget, no metadata server, another instance —
/// it does nothing.
const SELF_STOP: &str = r#"
ws=$1 delay=$2 poweroff=$3 identity=$4 metadata=$5 token=$6
sleep "$delay"
tries=3
while :; do
  exec 8>>"$ws/.lease"
  flock -n 8 || exit 0
  # Under the lease: a build since then removed the token.
  [ "$(cat "$ws/.stop-token" 2>/dev/null)" = "$token" ] || exit 0
  fetch() { # url [header]
    if command -v curl >/dev/null 2>&1; then curl -fsS -m 5 ${2:+-H "$2"} "$1"
    elif command -v wget >/dev/null 2>&1; then wget -qO- -T 5 ${2:+--header "$2"} "$1"
    else return 1; fi
  }
  case $identity in
    gce:*)
      # Project id, zone and name: one name may exist in many projects and zones.
      want=${identity#gce:}
      h='Metadata-Flavor: Google'
      p=$(fetch "$metadata/computeMetadata/v1/project/project-id" "$h") || exit 0
      z=$(fetch "$metadata/computeMetadata/v1/instance/zone" "$h") || exit 0
      n=$(fetch "$metadata/computeMetadata/v1/instance/name" "$h") || exit 0
      [ -n "$p" ] && [ -n "$z" ] && [ -n "$n" ] || exit 0
      got="$p/${z##*/}/$n" ;;
    ec2:*)
      want=${identity#ec2:}
      if command -v curl >/dev/null 2>&1; then
        tok=$(curl -fsS -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$metadata/latest/api/token") || exit 0
      else
        exit 0
      fi
      got=$(fetch "$metadata/latest/meta-data/instance-id" "X-aws-ec2-metadata-token: $tok") || exit 0 ;;
    azure:*)
      # `azure:<VM resource id> <ARM endpoint>`; ARM ids are case-insensitive.
      rest=${identity#azure:}
      want=$(printf '%s' "${rest%% *}" | tr 'A-Z' 'a-z')
      arm=${rest#* }
      command -v curl >/dev/null 2>&1 || exit 0
      got=$(fetch "$metadata/metadata/instance/compute/resourceId?api-version=2021-02-01&format=text" 'Metadata: true' | tr 'A-Z' 'a-z') || exit 0 ;;
    *) exit 0 ;;
  esac
  [ -n "$want" ] && [ "$got" = "$want" ] || exit 0
  # Other workspaces on this machine (other users' configs name their own), as
  # the idle watchdog finds them: those it recorded, and those whose `.lease`
  # some process has open; a workspace has a `runs` folder and a regular,
  # unlinked `.lease`. Each lease is taken without waiting and held while
  # powering off: while one is in use, no poweroff (tried again 3 times,
  # `delay` seconds apart, each time under this workspace's lease again).
  self=$(cd "$ws" && pwd -P) || exit 0
  is_ws() {
    case $1 in /*) ;; *) return 1 ;; esac
    [ -d "$1/runs" ] && [ -f "$1/.lease" ] && [ ! -L "$1/.lease" ]
  }
  others=$( { cat /var/lib/absconda-setup/workspaces 2>/dev/null
              ls -l /proc/[0-9]*/fd 2>/dev/null | sed -n 's|^.* -> \(/.*\)/\.lease$|\1|p'
            } | sort -u)
  set --
  while IFS= read -r w; do
    is_ws "$w" || continue
    [ "$(cd "$w" 2>/dev/null && pwd -P)" = "$self" ] && continue
    set -- "$@" "$w"
  done <<EOF
$others
EOF
  power() {
    rm -f "$ws/.stop-token"
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) self-stop after ${delay}s idle" >> "$ws/.self-stop.log"
    case $identity in
      azure:*)
        # Powering off inside the VM keeps it allocated and billed: deallocate
        # it through ARM with the VM's own managed identity. The token goes to
        # curl on stdin (printf is a shell builtin), never in an argument.
        tok=$(fetch "$metadata/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F" 'Metadata: true' |
          sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p')
        if [ -z "$tok" ]; then
          echo "self-stop: no managed identity token from the metadata service" >> "$ws/.self-stop.log"
          exit 0
        fi
        printf 'Authorization: Bearer %s\n' "$tok" |
          curl -fsS -m 30 -X POST -H @- -H 'Content-Length: 0' \
            "$arm${rest%% *}/deallocate?api-version=2024-07-01" -o /dev/null ||
          echo "self-stop: the ARM deallocate request failed" >> "$ws/.self-stop.log"
        exit 0 ;;
    esac
    exec sh -c "$poweroff"
  }
  hold() { # WS...: takes each lease (read-only, never created), then powers off
    if [ $# -eq 0 ]; then power; fi
    ( w=$1; shift
      [ ! -L "$w/.lease" ] && exec 7<"$w/.lease" && flock -n 7 || exit 75
      hold "$@" )
  }
  hold "$@"
  # Another workspace's build is running: try again later, a few times.
  [ $? -eq 75 ] && [ "$tries" -gt 0 ] || exit 0
  tries=$((tries - 1))
  exec 8>&-
  sleep "$delay"
done
"#;

/// For `--remote-off`: takes the lease (waiting a few seconds at most) and, holding it,
/// checks that no build waits for it. Prints `idle` and keeps the lease until
/// absconda closes stdin (after the stop call), so no build can start in
/// between; anything else (`busy`, `waiting`, an error) means leave it on.
const STOP_CHECK: &str = r#"
ws=$1
exec 9>>"$ws/.lease" || { echo "doubt cannot open $ws/.lease"; exit 0; }
# (A few seconds: the supervisor that just released may still be exiting.)
if ! flock -w 5 9; then
  printf 'busy %s\n' "$(tr -cd '\040-\176' < "$ws/.lease-holder" 2>/dev/null | cut -c1-200)"
  exit 0
fi
n=0
for f in "$ws"/.waiters/*; do
  [ -f "$f" ] || continue
  # Tickets are NUMBER-PID (see LEASE); the waiter's lease script is alive.
  if tr '\000' '\n' < "/proc/${f##*-}/cmdline" 2>/dev/null | grep -qx absconda-lease; then
    n=$((n + 1))
  fi
done
if [ "$n" -gt 0 ]; then echo "waiting $n"; exit 0; fi
echo idle
cat >/dev/null 9>&-
"#;

const RUN: &str = r#"
run=$1
shift
cd "$run" || exit 70
echo $$ > pid
"$@"
st=$?
rm -f pid
exit $st
"#;

/// `docker build` started beside the sync's request (in the run folder,
/// under [`RUN`]): it waits until the sync linked the copy into the run
/// folder and let go of the copy's lock, and runs only if the copy is then
/// marked clean with the manifest absconda sent, on the copy's own path.
/// Otherwise it prints `NONCE not-synced` on stderr and exits 99, and
/// absconda runs the build itself. After a successful build it prints
/// `NONCE iid IMAGE-ID` (from `--iidfile .iid`) on stderr, which saves a
/// `docker image inspect`.
///
/// With `streamed` (a cold send, see the sync script), it makes the fifo
/// `context.tar` in the run folder and runs `docker build -` on it, so
/// docker reads the context while the sync unpacks it into the copy; then
/// it waits for the sync to let go of the copy and counts the build only if
/// that sync marked the copy clean from this very stream (`streamed`).
const AFTER_SYNC: &str = r#"
nonce=$1 want=$2 wait=$3 streamed=$4
shift 4
refuse() { printf '%s not-synced\n' "$nonce" >&2; exit 99; }
# Holds the copy's lock, shared: its sync has ended (a sync holds it alone).
locked() {
  tree=$(readlink context) || refuse
  exec 8<"${tree%/tree}/lock" || refuse
  flock -s 8 || refuse
}
# Ends with the build's status, saying the image id after a success.
finish() {
  if [ "$1" -eq 0 ]; then printf '\n%s iid %s\n' "$nonce" "$(cat .iid 2>/dev/null)" >&2; fi
  exit "$1"
}
if [ "$streamed" = 1 ]; then
  rm -f context.tar
  mkfifo -m 600 context.tar || refuse
  "$@" - < context.tar
  st=$?
  rm -f context.tar
  locked
  read -r w m < streamed || refuse
  exec 8<&-
  [ "$w $m" = "clean $want" ] || refuse
  finish "$st"
fi
n=0
while [ ! -L context ]; do
  n=$((n + 1))
  [ "$n" -le $((wait * 50)) ] || refuse
  sleep 0.02
done
locked
read -r v st mh _ < "${tree%/tree}/state" || refuse
exec 8<&-
[ "$v $st $mh" = "v1 clean $want" ] || refuse
"$@" "$tree" </dev/null
finish $?
"#;

const UPLOAD: &str = r#"
cd "$1" || exit 70
shift
if [ "$1" = --zstd ]; then
  shift
  # A pipe's status is tar's: a failed zstd leaves a mark.
  { zstd -dcq || : > .zstd-failed; } | tar -x -o -f - "$@" || exit 1
  if [ -e .zstd-failed ]; then echo "zstd could not decode the context" >&2; exit 1; fi
  exit 0
fi
exec tar -x -o -f - "$@"
"#;

/// Stores the build's secrets (a tar stream on stdin) in a 0700 folder
/// `<tmpfs>/absconda-<uid>/<run id>`, on `/dev/shm` or `$XDG_RUNTIME_DIR`
/// when either is a tmpfs, or under the configured `secret_dir`. The folder
/// is recorded in `<workspace>/.secrets/<run id>` before it is created, so
/// the lease supervisor removes it at release, and the next lease sweeps it
/// when a supervisor died. Prints `secrets=<folder>`.
const SECRETS: &str = r#"
ws=$1 run=$2 dir=$3
umask 077
id=${run##*/}
fstype() {
  stat -f -c %T "$1" 2>/dev/null ||
    awk -v p="$1" '$2 == p { t = $3 } END { print t }' /proc/mounts 2>/dev/null
}
base=
if [ -n "$dir" ]; then
  base=$dir
else
  for d in /dev/shm "$XDG_RUNTIME_DIR"; do
    [ -n "$d" ] && [ -d "$d" ] && [ -w "$d" ] || continue
    case $(fstype "$d") in
      tmpfs|ramfs) base=$d; break ;;
    esac
  done
fi
if [ -z "$base" ]; then
  echo "neither /dev/shm nor \$XDG_RUNTIME_DIR (${XDG_RUNTIME_DIR:-not set}) is a writable tmpfs" >&2
  exit 71
fi
top=$base/absconda-$(id -u)
mkdir -p "$top" 2>/dev/null
if [ -L "$top" ] || ! [ -d "$top" ] || ! [ -O "$top" ] || ! chmod 700 "$top"; then
  echo "$top is not a folder owned by $(id -un)" >&2
  exit 71
fi
mkdir -p "$ws/.secrets" && printf '%s\n' "$top/$id" > "$ws/.secrets/$id" || exit 70
mkdir -m 700 "$top/$id" || exit 71
cd "$top/$id" && tar -x -o -f - || exit 72
printf 'secrets=%s\n' "$top/$id"
"#;

const PROBE: &str = r#"
docker=$1 ws=$2 known=$3
# What the docker answers below depend on, cheap to read: the docker binary
# and its plugins, the daemon's socket (a restarted or upgraded daemon
# makes a new one), the CLI's configuration and contexts, zstd, and the
# boot. absconda keeps the answers under this key and sends it back; while
# it holds, the docker CLI is not run at all. A daemon not on a local
# socket gives no key: it is asked every time.
probe_key() {
  case ${DOCKER_HOST:-unix:///var/run/docker.sock} in
    unix://*) sock=${DOCKER_HOST:-unix:///var/run/docker.sock}; sock=${sock#unix://} ;;
    *) return 0 ;;
  esac
  d=$(command -v "$docker" 2>/dev/null) || return 0
  [ -S "$sock" ] || return 0
  {
    printf '%s\n' v1 "$d" "$sock" "${DOCKER_CONTEXT-}" "${DOCKER_CONFIG-}" "${DOCKER_BUILDKIT-}" \
      "$(command -v zstd 2>/dev/null)" "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"
    cfg=${DOCKER_CONFIG:-$HOME/.docker}
    for f in "$d" "$sock" "$cfg/config.json" "$cfg/contexts/meta" "$cfg/cli-plugins/docker-buildx" \
      /usr/local/lib/docker/cli-plugins/docker-buildx /usr/local/libexec/docker/cli-plugins/docker-buildx \
      /usr/lib/docker/cli-plugins/docker-buildx /usr/libexec/docker/cli-plugins/docker-buildx; do
      stat -L -c '%n %i %s %Y %Z' "$f" 2>/dev/null || echo "$f -"
    done
  } | sha256sum | cut -c1-64
}
key=$(probe_key)
printf 'key=%s\n' "$key"
if [ -n "$key" ] && [ "$key" = "$known" ]; then
  echo cached=1
else
if v=$("$docker" version --format '{{.Server.Version}}' 2>&1); then
  printf 'server=%s\n' "$v"
else
  printf 'server_error=%s\n' "$(printf '%s' "$v" | tr '\n' ' ')"
fi
if p=$("$docker" version --format '{{.Server.Os}}/{{.Server.Arch}}' 2>/dev/null); then
  printf 'platform=%s\n' "$(printf '%s' "$p" | tr -cd 'a-z0-9_/' | cut -c1-64)"
fi
if "$docker" buildx version >/dev/null 2>&1; then echo buildx=1; else echo buildx=0; fi
# The context may travel zstd-compressed when the builder can decode it.
if command -v zstd >/dev/null 2>&1; then echo zstd=1; else echo zstd=0; fi
if DOCKER_BUILDKIT=1 "$docker" build --help >/dev/null 2>&1; then echo buildkit_env=1; else echo buildkit_env=0; fi
bh=$("$docker" build --help 2>/dev/null)
case $bh in *--cache-to*) echo build_cache_to=1 ;; esac
case $bh in *--build-context*) echo build_context=1 ;; esac
fi
if [ -d "$ws" ]; then d=$ws; else d=$(dirname "$ws"); fi
df -Pk "$d" 2>/dev/null | awk 'NR==2 { print "disk_total_kb=" $2; print "disk_avail_kb=" $4 }'
if [ -e "$ws/.lease" ] && ! flock -n "$ws/.lease" true 2>/dev/null; then
  printf 'lease_holder=%s\n' "$(tr -cd '\040-\176' < "$ws/.lease-holder" 2>/dev/null | cut -c1-200)"
  printf 'lease_since=%s\n' "$(stat -c %Y "$ws/.lease-holder" 2>/dev/null)"
fi
# The queue in ticket order (see LEASE): `waiter=<since> <holder>`.
n=0
for f in "$ws"/.waiters/*; do
  [ -f "$f" ] || continue
  if tr '\000' '\n' < "/proc/${f##*-}/cmdline" 2>/dev/null | grep -qx absconda-lease; then
    n=$((n + 1))
    printf 'waiter=%s\n' "$(head -n 1 "$f" | tr -cd '\040-\176' | cut -c1-220)"
  fi
done
printf 'waiters=%s\n' "$n"
printf 'user=%s\n' "$(id -un)"
"#;

/// What the self-stop needs: the command and the instance it may stop.
#[derive(Debug, Clone)]
pub struct SelfStop {
    pub delay: Duration,
    pub poweroff_command: String,
    /// `gce:<project id>/<zone>/<instance name>`, `ec2:<instance id>` or
    /// `azure:<VM resource id> <ARM endpoint>` (which deallocates through
    /// ARM); the script powers off
    /// only when the metadata server confirms it runs on that instance.
    pub identity: String,
    /// The metadata server as the builder reaches it
    /// (`http://metadata.google.internal`, `http://169.254.169.254`).
    pub metadata: String,
}

/// The lease supervisor for one build.
pub fn lease(
    workspace: &str,
    run_dir: &str,
    holder: &str,
    wait: Duration,
    self_stop: Option<&SelfStop>,
) -> String {
    let (delay, poweroff, identity, metadata) = match self_stop {
        Some(s) => (
            s.delay.as_secs().to_string(),
            s.poweroff_command.clone(),
            s.identity.clone(),
            s.metadata.clone(),
        ),
        None => (
            "-1".to_string(),
            String::new(),
            String::new(),
            String::new(),
        ),
    };
    shell::join([
        "sh",
        "-c",
        LEASE,
        "absconda-lease",
        workspace,
        run_dir,
        holder,
        &wait.as_secs().to_string(),
        &delay,
        &poweroff,
        &identity,
        &metadata,
        SELF_STOP,
    ])
}

/// The `--remote-off` check: see [`STOP_CHECK`].
pub fn stop_check(workspace: &str) -> String {
    shell::join(["sh", "-c", STOP_CHECK, "absconda-stop-check", workspace])
}

/// Runs `argv` inside the run folder, recording its process group so the
/// lease supervisor can kill it.
pub fn run_in(run_dir: &str, argv: &[String]) -> String {
    let mut words = vec![
        "sh".to_string(),
        "-c".into(),
        RUN.into(),
        "absconda-run".into(),
        run_dir.into(),
    ];
    words.extend(argv.iter().cloned());
    shell::join(words)
}

/// `argv` (a `docker build` without its context) started beside the
/// sync's request: see [`AFTER_SYNC`].
pub fn build_after_sync(
    run_dir: &str,
    nonce: &str,
    manifest: &str,
    streamed: bool,
    wait: Duration,
    argv: &[String],
) -> String {
    let mut words: Vec<String> = vec![
        "sh".into(),
        "-c".into(),
        AFTER_SYNC.into(),
        "absconda-after-sync".into(),
        nonce.into(),
        manifest.into(),
        wait.as_secs().to_string(),
        u8::from(streamed).to_string(),
    ];
    words.extend(argv.iter().cloned());
    run_in(run_dir, &words)
}

/// Unpacks a tar stream from stdin into the run folder.
pub fn upload(run_dir: &str, compression: crate::context::Compression) -> String {
    let mut words = vec!["sh", "-c", UPLOAD, "absconda-upload", run_dir];
    match compression {
        crate::context::Compression::None => {}
        crate::context::Compression::Gzip => words.push("-z"),
        crate::context::Compression::Zstd => words.push("--zstd"),
    }
    shell::join(words)
}

/// Stores the secrets streamed on stdin for the run (see [`SECRETS`]);
/// `dir` is the configured `secret_dir`, empty for a tmpfs found on the builder.
pub fn secrets(workspace: &str, run_dir: &str, dir: &str) -> String {
    shell::join([
        "sh",
        "-c",
        SECRETS,
        "absconda-secrets",
        workspace,
        run_dir,
        dir,
    ])
}

/// Reports the builder's docker, BuildKit support, disk and lease; when
/// `known` is the key the builder computes (see [`PROBE`]), only the key,
/// `cached=1`, the disk and the lease.
pub fn probe(docker: &str, workspace: &str, known: &str) -> String {
    shell::join([
        "sh",
        "-c",
        PROBE,
        "absconda-probe",
        docker,
        workspace,
        known,
    ])
}

/// What [`probe`] found.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ProbeReport {
    /// What the docker answers depend on (see [`PROBE`]); `None` when they
    /// cannot be kept.
    #[serde(skip)]
    pub key: Option<String>,
    /// The builder's key matched the one sent: the docker fields are unset
    /// and come from the kept report (see [`ProbeReport::with_docker_of`]).
    #[serde(skip)]
    pub cached: bool,
    pub docker_server: Option<String>,
    pub docker_error: Option<String>,
    pub buildx: bool,
    pub buildkit_env: bool,
    /// `docker build` is buildx: it takes `--cache-to`.
    pub build_cache_to: bool,
    /// `docker build` is buildx: it takes `--build-context`.
    pub build_context: bool,
    /// `zstd` is on the builder's PATH: the context may be zstd-compressed.
    pub zstd: bool,
    pub disk_total_kb: Option<u64>,
    pub disk_avail_kb: Option<u64>,
    pub lease_holder: Option<String>,
    /// When the holder took the lease (seconds since the epoch).
    pub lease_since: Option<i64>,
    /// Builds waiting for the lease.
    pub waiters: u32,
    /// The queue, first come first: since when (seconds since the epoch)
    /// and who.
    pub queue: Vec<(Option<i64>, String)>,
    pub user: Option<String>,
    /// The docker server's `os/arch`.
    pub platform: Option<String>,
}

impl ProbeReport {
    pub fn parse(text: &str) -> ProbeReport {
        let mut r = ProbeReport::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim().to_string();
            match k {
                "key" if !v.is_empty() => r.key = Some(v),
                "cached" => r.cached = v == "1",
                "server" => r.docker_server = Some(v),
                "server_error" => r.docker_error = Some(v),
                "buildx" => r.buildx = v == "1",
                "buildkit_env" => r.buildkit_env = v == "1",
                "build_cache_to" => r.build_cache_to = v == "1",
                "build_context" => r.build_context = v == "1",
                "zstd" => r.zstd = v == "1",
                "disk_total_kb" => r.disk_total_kb = v.parse().ok(),
                "disk_avail_kb" => r.disk_avail_kb = v.parse().ok(),
                "lease_holder" => r.lease_holder = Some(v),
                "lease_since" => r.lease_since = v.parse().ok(),
                "waiters" => r.waiters = v.parse().unwrap_or(0),
                "waiter" => {
                    let (since, who) = v.split_once(' ').unwrap_or((v.as_str(), ""));
                    r.queue.push((since.parse().ok(), who.to_string()));
                }
                "user" => r.user = Some(v),
                "platform" if !v.is_empty() => r.platform = Some(v),
                _ => {}
            }
        }
        r
    }

    /// This report with the docker fields of `kept` (a report made under
    /// the same key).
    pub fn with_docker_of(self, kept: &ProbeReport) -> ProbeReport {
        ProbeReport {
            docker_server: kept.docker_server.clone(),
            docker_error: kept.docker_error.clone(),
            buildx: kept.buildx,
            buildkit_env: kept.buildkit_env,
            build_cache_to: kept.build_cache_to,
            build_context: kept.build_context,
            zstd: kept.zstd,
            platform: kept.platform.clone(),
            ..self
        }
    }

    /// Whether `docker build` can run with BuildKit.
    pub fn buildkit_available(&self) -> bool {
        self.buildx || self.buildkit_env
    }

    /// Percentage of the workspace's disk in use.
    pub fn disk_used_pct(&self) -> Option<f64> {
        match (self.disk_total_kb, self.disk_avail_kb) {
            (Some(t), Some(a)) if t > 0 => Some(100.0 * (t.saturating_sub(a)) as f64 / t as f64),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_parsing() {
        let r = ProbeReport::parse(
            "server=20.10.24\nplatform=linux/arm64\nbuildx=0\nbuildkit_env=1\ndisk_total_kb=1000\ndisk_avail_kb=250\nlease_holder=ana@lap (pid 7) since 2026\nuser=root\n",
        );
        assert_eq!(r.docker_server.as_deref(), Some("20.10.24"));
        assert_eq!(r.platform.as_deref(), Some("linux/arm64"));
        assert!(r.buildkit_available());
        assert_eq!(r.disk_used_pct(), Some(75.0));
        assert_eq!(
            r.lease_holder.as_deref(),
            Some("ana@lap (pid 7) since 2026")
        );
    }

    /// Without a tmpfs the secrets program refuses to write anything, and
    /// with `secret_dir:` it uses that folder; in dash and busybox sh.
    #[test]
    fn secrets_refuse_disk_unless_configured() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        // Every file system looks disk-backed.
        let fake = bin.join("stat");
        std::fs::write(&fake, "#!/bin/sh\necho ext2/ext3\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let empty_tar = dir.path().join("empty.tar");
        std::fs::write(&empty_tar, vec![0u8; 10240]).unwrap();
        let ws = dir.path().join("ws");
        let id = "20260101T000000-0000abcd";
        let run = ws.join("runs").join(id);
        let configured = dir.path().join("disk-secrets");
        std::fs::create_dir_all(&run).unwrap();
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        for sh in ["dash", "busybox"] {
            let run_secrets = |cfg: &str| {
                let mut c = std::process::Command::new(sh);
                if sh == "busybox" {
                    c.arg("sh");
                }
                c.args(["-c", SECRETS, "absconda-secrets"])
                    .arg(&ws)
                    .arg(&run)
                    .arg(cfg)
                    .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
                    .env_remove("XDG_RUNTIME_DIR")
                    .stdin(std::fs::File::open(&empty_tar).unwrap())
                    .output()
            };
            // busybox sh runs its own `stat`, which the fake cannot replace.
            if sh == "dash" {
                let Ok(out) = run_secrets("") else { continue };
                assert_eq!(out.status.code(), Some(71), "{sh}");
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains("is a writable tmpfs"), "{sh}: {err}");
                assert!(
                    !ws.join(".secrets").exists(),
                    "{sh}: recorded without a folder"
                );
            }

            let Ok(out) = run_secrets(configured.to_str().unwrap()) else {
                continue;
            };
            let folder = configured.join(format!("absconda-{uid}")).join(id);
            assert!(
                out.status.success(),
                "{sh}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("secrets={}\n", folder.display())
            );
            let mode = std::fs::metadata(&folder).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
            assert_eq!(
                std::fs::read_to_string(ws.join(".secrets").join(id)).unwrap(),
                format!("{}\n", folder.display())
            );
            std::fs::remove_dir_all(&configured).unwrap();
            std::fs::remove_dir_all(ws.join(".secrets")).unwrap();
        }
    }

    /// The probe reads `docker build --help` for the flags only buildx has,
    /// in dash and busybox sh. (A stand-in prints the help texts of docker
    /// 20.10 and of buildx; nothing here builds.)
    #[test]
    fn probe_finds_buildx_flags_in_the_help() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for (help, cache_to, context) in [
            (
                "      --cache-from strings   Images to consider\n",
                false,
                false,
            ),
            (
                "      --build-context stringArray   Additional build contexts\n      --cache-to stringArray   Cache export\n",
                true,
                true,
            ),
        ] {
            let docker = dir.path().join("docker");
            std::fs::write(
                &docker,
                format!(
                    "#!/bin/sh\ncase \"$1 $2\" in 'build --help') printf '%s' '{help}' ;; 'version '*) echo 20.10 ;; *) exit 1 ;; esac\n"
                ),
            )
            .unwrap();
            std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).unwrap();
            for sh in crate::test_support::posix_shells() {
                let out = std::process::Command::new(sh[0])
                    .args(&sh[1..])
                    .args(["-c", PROBE, "absconda-probe"])
                    .arg(&docker)
                    .arg(dir.path().join("ws"))
                    .arg("")
                    .output()
                    .unwrap();
                let r = ProbeReport::parse(&String::from_utf8_lossy(&out.stdout));
                assert_eq!(r.build_cache_to, cache_to, "{sh:?} {help}");
                assert_eq!(r.build_context, context, "{sh:?} {help}");
                assert_eq!(r.docker_server.as_deref(), Some("20.10"));
            }
        }
    }

    /// The scripts must parse in dash and busybox sh, the shells of stock builders.
    #[test]
    fn scripts_parse_in_posix_shells() {
        for script in [
            LEASE, SELF_STOP, STOP_CHECK, RUN, UPLOAD, PROBE, SECRETS, AFTER_SYNC,
        ] {
            crate::test_support::assert_parses(script);
        }
    }
}

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
//! minute. Its protocol lines start with a nonce absconda sends first, so no
//! builder-side text can forge one.

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
# absconda's first line is this build's nonce, and every protocol line
# starts with it: no text from the builder (the holder file, a user name)
# can pass for one. Holder text is cut to printable ASCII on one line.
IFS= read -r nonce || exit 1
case $nonce in ''|*[!0-9a-f]*) echo "error the lease request had no nonce" >&2; exit 2 ;; esac
say() { printf '%s %s\n' "$nonce" "$*"; }
holder_now() { tr -cd '\040-\176' < "$ws/.lease-holder" 2>/dev/null | cut -c1-200; }
if ! mkdir -p "$ws/runs" 2>/dev/null || ! [ -w "$ws" ]; then
  echo "error cannot create or write the workspace $ws as $(id -un)" >&2
  exit 70
fi
exec 9>>"$ws/.lease" || exit 70
if ! flock -n 9; then
  # Let `--remote-off` see that a build is waiting for this builder.
  mkdir -p "$ws/.waiters" && : > "$ws/.waiters/$$"
  trap 'rm -f "$ws/.waiters/$$"' EXIT
  say busy "$(holder_now)"
  start=$(date +%s)
  until flock -w 2 9; do
    if [ $(( $(date +%s) - start )) -ge "$wait" ]; then
      say timeout "$(holder_now)"
      exit 75
    fi
    say waiting "$(holder_now)" || exit 1
  done
  rm -f "$ws/.waiters/$$"
fi
# A build arriving cancels a pending self-stop.
if [ -s "$ws/.stop-pid" ]; then
  kill "$(cat "$ws/.stop-pid")" 2>/dev/null
  rm -f "$ws/.stop-pid"
fi
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
rm -rf "$run"
rm -f "$ws/.lease-holder"
: > "$ws/.lease-holder"
touch "$ws/.last-used"
if [ "$stop_delay" -ge 0 ] 2>/dev/null && [ -n "$poweroff" ]; then
  sh -c "$SELF_STOP" absconda-self-stop "$ws" "$stop_delay" "$poweroff" "$identity" "$metadata" \
    9>&- </dev/null >/dev/null 2>&1 &
  echo $! > "$ws/.stop-pid"
fi
say released
"#;

/// Powers the builder off after `delay` seconds unless a build took the
/// lease meanwhile, and only on the instance it was scheduled for: the
/// metadata server must confirm the instance name (GCE) or id (EC2). When it
/// cannot be proven — no curl or wget, no metadata server, another instance —
/// it does nothing.
const SELF_STOP: &str = r#"
ws=$1 delay=$2 poweroff=$3 identity=$4 metadata=$5
sleep "$delay"
[ "$(cat "$ws/.stop-pid" 2>/dev/null)" = "$$" ] || exit 0
exec 8>>"$ws/.lease"
flock -n 8 || exit 0
fetch() { # url [header]
  if command -v curl >/dev/null 2>&1; then curl -fsS -m 5 ${2:+-H "$2"} "$1"
  elif command -v wget >/dev/null 2>&1; then wget -qO- -T 5 ${2:+--header "$2"} "$1"
  else return 1; fi
}
case $identity in
  gce:*)
    want=${identity#gce:}
    got=$(fetch "$metadata/computeMetadata/v1/instance/name" 'Metadata-Flavor: Google') || exit 0 ;;
  ec2:*)
    want=${identity#ec2:}
    if command -v curl >/dev/null 2>&1; then
      tok=$(curl -fsS -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$metadata/latest/api/token") || exit 0
    else
      exit 0
    fi
    got=$(fetch "$metadata/latest/meta-data/instance-id" "X-aws-ec2-metadata-token: $tok") || exit 0 ;;
  *) exit 0 ;;
esac
[ -n "$want" ] && [ "$got" = "$want" ] || exit 0
rm -f "$ws/.stop-pid"
echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) self-stop after ${delay}s idle" >> "$ws/.self-stop.log"
exec sh -c "$poweroff"
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

const UPLOAD: &str = r#"
cd "$1" || exit 70
shift
exec tar -x -o -f - "$@"
"#;

const PROBE: &str = r#"
docker=$1 ws=$2
if v=$("$docker" version --format '{{.Server.Version}}' 2>&1); then
  printf 'server=%s\n' "$v"
else
  printf 'server_error=%s\n' "$(printf '%s' "$v" | tr '\n' ' ')"
fi
if "$docker" buildx version >/dev/null 2>&1; then echo buildx=1; else echo buildx=0; fi
if DOCKER_BUILDKIT=1 "$docker" build --help >/dev/null 2>&1; then echo buildkit_env=1; else echo buildkit_env=0; fi
if [ -d "$ws" ]; then d=$ws; else d=$(dirname "$ws"); fi
df -Pk "$d" 2>/dev/null | awk 'NR==2 { print "disk_total_kb=" $2; print "disk_avail_kb=" $4 }'
if [ -e "$ws/.lease" ] && ! flock -n "$ws/.lease" true 2>/dev/null; then
  printf 'lease_holder=%s\n' "$(tr -cd '\040-\176' < "$ws/.lease-holder" 2>/dev/null | cut -c1-200)"
fi
n=0
for f in "$ws"/.waiters/*; do
  [ -e "$f" ] || continue
  if [ -d "/proc/${f##*/}" ]; then n=$((n + 1)); else rm -f "$f"; fi
done
printf 'waiters=%s\n' "$n"
printf 'user=%s\n' "$(id -un)"
"#;

/// What the self-stop needs: the command and the instance it may stop.
#[derive(Debug, Clone)]
pub struct SelfStop {
    pub delay: Duration,
    pub poweroff_command: String,
    /// `gce:<instance name>` or `ec2:<instance id>`; the script powers off
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

/// Unpacks a tar stream from stdin into the run folder.
pub fn upload(run_dir: &str, gzip: bool) -> String {
    let mut words = vec!["sh", "-c", UPLOAD, "absconda-upload", run_dir];
    if gzip {
        words.push("-z");
    }
    shell::join(words)
}

/// Reports the builder's docker, BuildKit support, disk and lease.
pub fn probe(docker: &str, workspace: &str) -> String {
    shell::join(["sh", "-c", PROBE, "absconda-probe", docker, workspace])
}

/// What [`probe`] found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProbeReport {
    pub docker_server: Option<String>,
    pub docker_error: Option<String>,
    pub buildx: bool,
    pub buildkit_env: bool,
    pub disk_total_kb: Option<u64>,
    pub disk_avail_kb: Option<u64>,
    pub lease_holder: Option<String>,
    /// Builds waiting for the lease.
    pub waiters: u32,
    pub user: Option<String>,
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
                "server" => r.docker_server = Some(v),
                "server_error" => r.docker_error = Some(v),
                "buildx" => r.buildx = v == "1",
                "buildkit_env" => r.buildkit_env = v == "1",
                "disk_total_kb" => r.disk_total_kb = v.parse().ok(),
                "disk_avail_kb" => r.disk_avail_kb = v.parse().ok(),
                "lease_holder" => r.lease_holder = Some(v),
                "waiters" => r.waiters = v.parse().unwrap_or(0),
                "user" => r.user = Some(v),
                _ => {}
            }
        }
        r
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
            "server=20.10.24\nbuildx=0\nbuildkit_env=1\ndisk_total_kb=1000\ndisk_avail_kb=250\nlease_holder=ana@lap (pid 7) since 2026\nuser=root\n",
        );
        assert_eq!(r.docker_server.as_deref(), Some("20.10.24"));
        assert!(r.buildkit_available());
        assert_eq!(r.disk_used_pct(), Some(75.0));
        assert_eq!(
            r.lease_holder.as_deref(),
            Some("ana@lap (pid 7) since 2026")
        );
    }

    /// The scripts must parse in dash and busybox sh, the shells of stock builders.
    #[test]
    fn scripts_parse_in_posix_shells() {
        for script in [LEASE, SELF_STOP, RUN, UPLOAD, PROBE] {
            crate::test_support::assert_parses(script);
        }
    }
}

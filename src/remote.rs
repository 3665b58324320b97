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
//! depend on the client surviving.

use std::time::Duration;

use crate::shell;

/// Exit status of the lease script when `--remote-wait` ran out.
pub const LEASE_TIMEOUT_STATUS: u32 = 75;
/// Exit status of a script that could not set up the workspace.
pub const WORKSPACE_STATUS: u32 = 70;

const LEASE: &str = r#"
ws=$1 run=$2 holder=$3 wait=$4 stop_delay=$5 poweroff=$6 identity=$7 metadata=$8
SELF_STOP=$9
umask 077
trap '' HUP PIPE
if ! mkdir -p "$ws/runs" 2>/dev/null || ! [ -w "$ws" ]; then
  echo "error cannot create or write the workspace $ws as $(id -un)" >&2
  exit 70
fi
exec 9>>"$ws/.lease" || exit 70
if ! flock -n 9; then
  # Let `--remote-off` see that a build is waiting for this builder.
  mkdir -p "$ws/.waiters" && : > "$ws/.waiters/$$"
  trap 'rm -f "$ws/.waiters/$$"' EXIT
  printf 'busy %s\n' "$(cat "$ws/.lease-holder" 2>/dev/null)"
  start=$(date +%s)
  until flock -w 2 9; do
    if [ $(( $(date +%s) - start )) -ge "$wait" ]; then
      printf 'timeout %s\n' "$(cat "$ws/.lease-holder" 2>/dev/null)"
      exit 75
    fi
    printf 'waiting %s\n' "$(cat "$ws/.lease-holder" 2>/dev/null)" || exit 1
  done
  rm -f "$ws/.waiters/$$"
fi
# A build arriving cancels a pending self-stop.
if [ -s "$ws/.stop-pid" ]; then
  kill "$(cat "$ws/.stop-pid")" 2>/dev/null
  rm -f "$ws/.stop-pid"
fi
printf '%s\n' "$holder" > "$ws/.lease-holder"
if ! mkdir "$run"; then
  echo "error cannot create the run folder $run" >&2
  exit 70
fi
echo acquired
# Hold the lease until the client closes stdin or disappears.
cat >/dev/null 9>&-
if [ -s "$run/pid" ]; then
  pid=$(cat "$run/pid")
  kill -TERM -"$pid" 2>/dev/null
  n=0
  while kill -0 -"$pid" 2>/dev/null && [ $n -lt 20 ]; do sleep 0.5; n=$((n + 1)); done
  kill -KILL -"$pid" 2>/dev/null
fi
rm -rf "$run"
: > "$ws/.lease-holder"
touch "$ws/.last-used"
if [ "$stop_delay" -ge 0 ] 2>/dev/null && [ -n "$poweroff" ]; then
  sh -c "$SELF_STOP" absconda-self-stop "$ws" "$stop_delay" "$poweroff" "$identity" "$metadata" \
    9>&- </dev/null >/dev/null 2>&1 &
  echo $! > "$ws/.stop-pid"
fi
echo released
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
rm -f "$ws/.stop-pid"
echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) self-stop after ${delay}s idle" >> "$ws/.self-stop.log"
case $identity in
  azure:*)
    # Powering off inside the VM keeps it allocated and billed: deallocate it
    # through ARM with the VM's own managed identity. The token goes to curl
    # on stdin (printf is a shell builtin), never in an argument.
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
  printf 'lease_holder=%s\n' "$(cat "$ws/.lease-holder" 2>/dev/null)"
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
    /// `gce:<instance name>`, `ec2:<instance id>` or `azure:<VM resource id>
    /// <ARM endpoint>` (which deallocates through ARM); the script powers off
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

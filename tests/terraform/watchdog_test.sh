#!/bin/sh
# Checks the idle watchdog that infra/gcp and infra/aws install on builders
# (infra/scripts/absconda-idle-watchdog.sh) against temporary workspaces,
# with a harmless poweroff command that only records that it ran and whether
# the watchdog held the build leases at that moment. Other workspaces are
# found through a stand-in for /proc (and once through the real one), the
# metadata server is a stub curl answering from files.
#
# Usage: sh tests/terraform/watchdog_test.sh
#        WATCHDOG_SH="busybox sh" sh tests/terraform/watchdog_test.sh
# Needs flock(1), touch(1) and date(1) (util-linux and GNU coreutils).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
watchdog=$here/../../infra/scripts/absconda-idle-watchdog.sh

for tool in flock touch date; do
	if ! command -v "$tool" >/dev/null 2>&1; then
		echo "watchdog_test: $tool is missing" >&2
		exit 1
	fi
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

ws=$tmp/workspace
log=$tmp/poweroff.log
fake=$tmp/fake-poweroff

# The fake poweroff command: record one line, saying whether the lease was
# free (it must not be: the watchdog holds it while powering off).
cat >"$fake" <<'EOF'
#!/bin/sh
if flock -n "$1/.lease" true; then
	echo "poweroff lease=free" >>"$2"
else
	echo "poweroff lease=held" >>"$2"
fi
exit "${3:-0}"
EOF
chmod +x "$fake"

# The same for several workspaces: fake-all LOG WS...
cat >"$tmp/fake-all" <<'EOF'
#!/bin/sh
log=$1
shift
line=poweroff
for w in "$@"; do
	if flock -n "$w/.lease" true; then line="$line $(basename "$w")=free"; else line="$line $(basename "$w")=held"; fi
done
echo "$line" >>"$log"
EOF
chmod +x "$tmp/fake-all"

# A stub curl for the metadata server: the answer to .../computeMetadata/v1/P
# is the file $tmp/meta/P; no file, no answer (status 22, as curl -f).
mkdir -p "$tmp/bin" "$tmp/meta/project" "$tmp/meta/instance"
cat >"$tmp/bin/curl" <<EOF
#!/bin/sh
for a in "\$@"; do url=\$a; done
case \$url in
http://metadata.test/computeMetadata/v1/*) f=$tmp/meta/\${url#http://metadata.test/computeMetadata/v1/} ;;
*) exit 6 ;;
esac
[ -f "\$f" ] || exit 22
cat "\$f"
EOF
chmod +x "$tmp/bin/curl"

now=$(date +%s)
two_hours_ago=$((now - 7200))
one_minute_ago=$((now - 60))
long_ago=$((now - 86400))

passed=0
failed=0
status=0

ok() {
	passed=$((passed + 1))
	echo "ok - $1"
}

not_ok() {
	failed=$((failed + 1))
	echo "not ok - $1"
}

# Fresh workspace with a lease file and, optionally, a .last-used time.
reset_workspace() {
	rm -rf "$ws" "$log" "$tmp/proc" "$tmp/workspaces" "$tmp/other"*
	mkdir -p "$ws" "$tmp/proc"
	: >"$ws/.lease"
	if [ -n "${1:-}" ]; then
		touch -d "@$1" "$ws/.last-used"
	fi
}

# run_watchdog BOOT_TIME [EXTRA ARGS...]: run with a 30-minute limit; the
# status lands in $status. fd 8 (a lease held by a test) is not inherited.
run_watchdog() {
	boot=$1
	shift
	set +e
	ABSCONDA_WORKSPACE=$ws \
		ABSCONDA_IDLE_MINUTES=${IDLE:-30} \
		ABSCONDA_BOOT_TIME=$boot \
		ABSCONDA_HOLD_SECONDS=0 \
		ABSCONDA_PROC="${PROC:-$tmp/proc}" \
		ABSCONDA_WORKSPACES_FILE="$tmp/workspaces" \
		ABSCONDA_IDENTITY="${IDENTITY:-}" \
		ABSCONDA_METADATA_URL=http://metadata.test \
		PATH="$tmp/bin:$PATH" \
		POWEROFF_COMMAND="${POWEROFF:-$fake $ws $log}" \
		${WATCHDOG_SH:-sh} "$watchdog" "$@" 8>&- 2>>"$tmp/stderr"
	status=$?
	set -e
}

powered_off() {
	[ -s "$log" ]
}

check() { # check NAME EXPECTED_STATUS EXPECTED_POWEROFF(yes|no)
	name=$1
	if [ "$status" -ne "$2" ]; then
		not_ok "$name (exit status $status, expected $2)"
		return
	fi
	if [ "$3" = yes ]; then
		if ! powered_off; then
			not_ok "$name (the poweroff command did not run)"
			return
		fi
		if [ "$(cat "$log")" != "poweroff lease=held" ]; then
			not_ok "$name (poweroff ran once with the lease held: got '$(cat "$log")')"
			return
		fi
	elif powered_off; then
		not_ok "$name (the poweroff command ran)"
		return
	fi
	ok "$name"
}

# 1. A build holds the lease: never power off, however old .last-used is.
reset_workspace "$two_hours_ago"
exec 8>>"$ws/.lease"
flock -n 8
run_watchdog "$long_ago"
check "lease held by a build -> no poweroff" 0 no
flock -u 8
exec 8>&-

# 2. Lease free, but the last build ended a minute ago.
reset_workspace "$one_minute_ago"
run_watchdog "$long_ago"
check "idle but .last-used recent -> no poweroff" 0 no

# 3. Lease free and the last build ended two hours ago.
reset_workspace "$two_hours_ago"
run_watchdog "$long_ago"
check "idle and .last-used old -> poweroff, lease held meanwhile" 0 yes

# 4. No build ever ran (.last-used missing) and the machine booted long ago.
reset_workspace ""
run_watchdog "$long_ago"
check "no .last-used and boot long ago -> poweroff" 0 yes

# 5. An old .last-used on a machine that was just started: absconda has not
#    had the time to take the lease yet.
reset_workspace "$two_hours_ago"
run_watchdog "$one_minute_ago"
check "old .last-used but booted a minute ago -> no poweroff" 0 no

# 6. 0 minutes disables the watchdog.
reset_workspace "$two_hours_ago"
IDLE=0 run_watchdog "$long_ago"
check "idle minutes 0 -> no poweroff" 0 no

# 7. Arguments win over the environment (workspace and minutes).
reset_workspace "$two_hours_ago"
IDLE=0 run_watchdog "$long_ago" "$ws" 30
check "arguments override the environment" 0 yes

# 8. The lease is released once the watchdog has finished.
reset_workspace "$two_hours_ago"
run_watchdog "$long_ago"
if flock -n "$ws/.lease" true; then
	ok "lease free again after the watchdog exits"
else
	not_ok "lease free again after the watchdog exits"
fi

# 9. A failing poweroff command is reported.
reset_workspace "$two_hours_ago"
POWEROFF="$fake $ws $log 3" run_watchdog "$long_ago"
if [ "$status" -eq 1 ] && powered_off; then
	ok "failing poweroff command -> exit status 1"
else
	not_ok "failing poweroff command -> exit status 1 (got $status)"
fi

# 10. A missing workspace is an error, not a reason to power off.
rm -rf "$ws" "$log"
run_watchdog "$long_ago"
check "missing workspace -> error, no poweroff" 1 no

# 11. Nonsense minutes are a usage error.
reset_workspace "$two_hours_ago"
IDLE=soon run_watchdog "$long_ago"
check "non-numeric idle minutes -> usage error" 2 no

# 12. A lease file someone removed is recreated, and still respected.
reset_workspace "$two_hours_ago"
rm -f "$ws/.lease"
run_watchdog "$long_ago"
if [ -e "$ws/.lease" ] && powered_off; then
	ok "missing lease file is recreated"
else
	not_ok "missing lease file is recreated"
fi

# other_workspace NAME [LAST_USED]: a workspace some build used, as the
# lease script leaves it (a runs folder beside .lease).
other_workspace() {
	mkdir -p "$tmp/$1/runs"
	: >"$tmp/$1/.lease"
	if [ -n "${2:-}" ]; then
		touch -d "@$2" "$tmp/$1/.last-used"
	fi
}

# open_by_a_process PID WS: the stand-in /proc shows WS/.lease open by PID.
open_by_a_process() {
	mkdir -p "$tmp/proc/$1/fd"
	ln -s /dev/null "$tmp/proc/$1/fd/0"
	ln -s "$2/.lease" "$tmp/proc/$1/fd/9"
}

# 13. A build holds another workspace's lease (seen in /proc): busy.
reset_workspace "$two_hours_ago"
other_workspace other1 "$two_hours_ago"
open_by_a_process 4242 "$tmp/other1"
exec 8>>"$tmp/other1/.lease"
flock -n 8
run_watchdog "$long_ago"
check "another workspace's lease held -> no poweroff" 0 no
flock -u 8
exec 8>&-
if grep -qxF "$tmp/other1" "$tmp/workspaces" 2>/dev/null; then
	ok "a workspace found in use is remembered"
else
	not_ok "a workspace found in use is remembered"
fi

# 14. The same with the real /proc and a real process holding the lease.
reset_workspace "$two_hours_ago"
other_workspace other2 "$two_hours_ago"
flock "$tmp/other2/.lease" sleep 60 8>&- &
holder=$!
deadline=$((now + 30))
while flock -n "$tmp/other2/.lease" true; do
	[ "$(date +%s)" -lt "$deadline" ] || break
done
PROC=/proc run_watchdog "$long_ago"
check "another workspace's lease held (real /proc) -> no poweroff" 0 no
kill "$holder" 2>/dev/null || true
wait "$holder" 2>/dev/null || true

# 15. Another workspace, remembered, used a minute ago: not idle.
reset_workspace "$two_hours_ago"
other_workspace other3 "$one_minute_ago"
echo "$tmp/other3" >"$tmp/workspaces"
run_watchdog "$long_ago"
check "another workspace used a minute ago -> no poweroff" 0 no

# 16. Every workspace idle: poweroff with every lease held.
reset_workspace "$two_hours_ago"
other_workspace other4 "$two_hours_ago"
other_workspace other5 "$two_hours_ago"
echo "$tmp/other4" >"$tmp/workspaces"
open_by_a_process 4243 "$tmp/other5"
POWEROFF="$tmp/fake-all $log $ws $tmp/other4 $tmp/other5" run_watchdog "$long_ago"
if [ "$status" -eq 0 ] && [ "$(cat "$log" 2>/dev/null)" = "poweroff workspace=held other4=held other5=held" ]; then
	ok "all idle -> poweroff with every workspace's lease held"
else
	not_ok "all idle -> poweroff with every workspace's lease held (status $status, log '$(cat "$log" 2>/dev/null)')"
fi

# 17. A .lease that is a symlink is never opened (nor created through).
reset_workspace "$two_hours_ago"
mkdir -p "$tmp/other6/runs"
ln -s "$tmp/victim" "$tmp/other6/.lease"
echo "$tmp/other6" >"$tmp/workspaces"
open_by_a_process 4244 "$tmp/other6"
run_watchdog "$long_ago"
if [ ! -e "$tmp/victim" ] && [ "$status" -eq 0 ] && powered_off; then
	ok "a symlinked lease is ignored, its target not created"
else
	not_ok "a symlinked lease is ignored, its target not created (status $status)"
fi
rm -f "$tmp/victim"

# 18-21. GCE identity: project, zone and name must all match.
set_metadata() { # PROJECT ZONE NAME
	printf '%s' "$1" >"$tmp/meta/project/project-id"
	printf 'projects/123456789/zones/%s' "$2" >"$tmp/meta/instance/zone"
	printf '%s' "$3" >"$tmp/meta/instance/name"
}
want=gce:team-proj/us-east1-b/builder
reset_workspace "$two_hours_ago"
set_metadata team-proj us-east1-b builder
IDENTITY=$want run_watchdog "$long_ago"
check "GCE identity confirmed -> poweroff" 0 yes

reset_workspace "$two_hours_ago"
set_metadata team-proj us-east1-c builder
IDENTITY=$want run_watchdog "$long_ago"
check "same name in another zone -> no poweroff" 1 no

reset_workspace "$two_hours_ago"
set_metadata other-proj us-east1-b builder
IDENTITY=$want run_watchdog "$long_ago"
check "same name in another project -> no poweroff" 1 no

reset_workspace "$two_hours_ago"
rm -f "$tmp/meta/instance/zone"
IDENTITY=$want run_watchdog "$long_ago"
check "metadata server not answering -> no poweroff" 1 no

reset_workspace "$two_hours_ago"
IDENTITY=builder run_watchdog "$long_ago"
check "malformed identity -> usage error" 2 no

echo "$passed passed, $failed failed"
if [ "$failed" -ne 0 ]; then
	echo "watchdog stderr:" >&2
	cat "$tmp/stderr" >&2 || true
	exit 1
fi

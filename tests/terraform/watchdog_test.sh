#!/bin/sh
# Checks the idle watchdog that infra/gcp and infra/aws install on builders
# (infra/scripts/absconda-idle-watchdog.sh) against a temporary workspace,
# with a harmless poweroff command that only records that it ran and whether
# the watchdog held the build lease at that moment.
#
# Usage: sh tests/terraform/watchdog_test.sh
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
	rm -rf "$ws" "$log"
	mkdir -p "$ws"
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
		POWEROFF_COMMAND="${POWEROFF:-$fake $ws $log}" \
		sh "$watchdog" "$@" 8>&- 2>>"$tmp/stderr"
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

echo "$passed passed, $failed failed"
if [ "$failed" -ne 0 ]; then
	echo "watchdog stderr:" >&2
	cat "$tmp/stderr" >&2 || true
	exit 1
fi

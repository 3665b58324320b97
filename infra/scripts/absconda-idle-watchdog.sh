#!/bin/sh
# absconda-idle-watchdog: power this builder off once it has been idle.
#
# Installed on every builder by the startup script of infra/gcp and infra/aws
# and run once a minute by absconda-idle-watchdog.timer, so that a builder
# nobody stops by hand stops costing money.
#
# "Idle" means both:
#   - nobody holds the build lease: every build holds an exclusive flock(1) on
#     WORKSPACE/.lease while it runs;
#   - the last activity is older than IDLE_MINUTES. The last activity is the
#     newer of WORKSPACE/.last-used (touched by absconda at the end of every
#     build) and the boot time. Counting from boot means a builder that was
#     just started is never powered off before absconda had time to take the
#     lease, however old .last-used is.
#
# The watchdog takes the lease itself (flock -n) before it looks, and keeps it
# while it powers off, so a build that starts at that moment either waits for
# the lease or sees the machine going down; it can never run on a machine that
# is being switched off under it. After the poweroff command has been accepted
# the lease is held for HOLD_SECONDS more, until shutdown kills this process.
#
# Usage: absconda-idle-watchdog [WORKSPACE [IDLE_MINUTES]]
#
# Environment (arguments win over the environment):
#   ABSCONDA_WORKSPACE       the builder workspace      (default /var/lib/absconda)
#   ABSCONDA_IDLE_MINUTES    whole minutes; 0 disables  (default 30)
#   POWEROFF_COMMAND         run when idle; split on blanks, never through a
#                            shell                      (default "systemctl poweroff")
#   ABSCONDA_BOOT_TIME       boot time, seconds since the epoch
#                            (default: btime from /proc/stat)
#   ABSCONDA_HOLD_SECONDS    keep the lease this long after the poweroff
#                            command succeeded          (default 300)
#
# Exit status: 0 when the builder is busy, recently used or was powered off;
# 1 when something is wrong (missing workspace, failed poweroff command);
# 2 for bad arguments.
set -eu

workspace=${1:-${ABSCONDA_WORKSPACE:-/var/lib/absconda}}
idle_minutes=${2:-${ABSCONDA_IDLE_MINUTES:-30}}
poweroff_command=${POWEROFF_COMMAND:-systemctl poweroff}
hold_seconds=${ABSCONDA_HOLD_SECONDS:-300}

log() {
	printf 'absconda-idle-watchdog: %s\n' "$*" >&2
}

is_whole_number() {
	case $1 in
	'' | *[!0-9]*) return 1 ;;
	*) return 0 ;;
	esac
}

if ! is_whole_number "$idle_minutes"; then
	log "idle minutes must be a whole number, got '$idle_minutes'"
	exit 2
fi
if ! is_whole_number "$hold_seconds"; then
	log "ABSCONDA_HOLD_SECONDS must be a whole number, got '$hold_seconds'"
	exit 2
fi
if [ "$idle_minutes" -eq 0 ]; then
	exit 0
fi
case $workspace in
/*) ;;
*)
	log "the workspace must be an absolute path, got '$workspace'"
	exit 2
	;;
esac
if [ ! -d "$workspace" ]; then
	# Without a workspace there is no lease to respect; refuse to guess.
	log "workspace $workspace does not exist; not powering off"
	exit 1
fi

lease=$workspace/.lease
last_used=$workspace/.last-used

if [ ! -e "$lease" ]; then
	# The startup script creates the lease owned by the SSH user; recreate it
	# the same way if someone removed it, so builds can still open it.
	: >>"$lease"
	chown "$(stat -c %u:%g "$workspace")" "$lease" 2>/dev/null || true
	chmod 0660 "$lease" 2>/dev/null || true
fi

# Open the lease on fd 9 (append: never truncates, creates nothing new) and
# try to lock it without waiting. A running build holds it: nothing to do.
exec 9>>"$lease"
if ! flock -n 9; then
	exit 0
fi

# From here on we hold the lease: no build can start until we exit.
now=$(date +%s)
boot_time=${ABSCONDA_BOOT_TIME:-}
if [ -z "$boot_time" ]; then
	boot_time=$(sed -n 's/^btime \([0-9][0-9]*\)$/\1/p' /proc/stat)
fi
if ! is_whole_number "$boot_time"; then
	log "could not tell the boot time (got '$boot_time'); not powering off"
	exit 1
fi

last_activity=$boot_time
if [ -e "$last_used" ]; then
	last_used_time=$(stat -c %Y "$last_used")
	if [ "$last_used_time" -gt "$last_activity" ]; then
		last_activity=$last_used_time
	fi
fi

idle_seconds=$((now - last_activity))
limit_seconds=$((idle_minutes * 60))
if [ "$idle_seconds" -lt "$limit_seconds" ]; then
	exit 0
fi

log "no build for $((idle_seconds / 60)) min (limit $idle_minutes min): running '$poweroff_command'"
# Word splitting is wanted here (the command and its arguments); globbing is not.
set -f
# shellcheck disable=SC2086
if ! $poweroff_command; then
	log "'$poweroff_command' failed; releasing the lease"
	exit 1
fi
set +f

# Keep the lease until shutdown stops this service, so no build starts on a
# machine that is going down.
if [ "$hold_seconds" -gt 0 ]; then
	sleep "$hold_seconds"
fi
exit 0

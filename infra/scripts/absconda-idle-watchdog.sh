#!/bin/sh
# absconda-idle-watchdog: power this builder off once it has been idle.
#
# Installed on every builder by the startup script of infra/gcp and infra/aws
# and run once a minute by absconda-idle-watchdog.timer, so that a builder
# nobody stops by hand stops costing money.
#
# A builder may serve several workspaces: each user's absconda config names
# its own (`workspace:`). The watchdog knows them all: the configured one,
# every workspace it has seen before (listed in WORKSPACES_FILE), and every
# workspace whose `.lease` some process has open right now (found in /proc;
# a workspace is a folder with a `runs` folder beside its `.lease`). Each one
# it finds is added to WORKSPACES_FILE, so its `.last-used` counts from then on.
#
# "Idle" means both:
#   - nobody holds a build lease: every build holds an exclusive flock(1) on
#     its WORKSPACE/.lease while it runs;
#   - the last activity is older than IDLE_MINUTES. The last activity is the
#     newest of every workspace's .last-used (touched by absconda at the end
#     of every build) and the boot time. Counting from boot means a builder
#     that was just started is never powered off before absconda had time to
#     take a lease, however old .last-used is.
#
# The watchdog takes every lease itself (flock -n) before it looks, and keeps
# them while it powers off, so a build that starts at that moment either waits
# for its lease or sees the machine going down; it can never run on a machine
# that is being switched off under it. After the poweroff command has been
# accepted the leases are held for HOLD_SECONDS more, until shutdown kills
# this process. Leases are opened read-only and never created (except the
# configured workspace's own), and never through a symlink.
#
# On GCE the watchdog powers off only the instance it was installed for: with
# ABSCONDA_IDENTITY=gce:PROJECT/ZONE/NAME the metadata server must report that
# project (project/project-id), zone (instance/zone) and name (instance/name),
# or nothing is powered off (a disk cloned into another VM stays harmless).
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
#   ABSCONDA_IDENTITY        gce:PROJECT/ZONE/NAME, or empty for no check
#   ABSCONDA_METADATA_URL    (default http://metadata.google.internal)
#   ABSCONDA_WORKSPACES_FILE workspaces seen so far, one a line
#                            (default /var/lib/absconda-setup/workspaces)
#   ABSCONDA_PROC            where /proc is (default /proc)
#
# Exit status: 0 when the builder is busy, recently used or was powered off;
# 1 when something is wrong (missing workspace, failed poweroff command);
# 2 for bad arguments.
set -eu

workspace=${1:-${ABSCONDA_WORKSPACE:-/var/lib/absconda}}
idle_minutes=${2:-${ABSCONDA_IDLE_MINUTES:-30}}
poweroff_command=${POWEROFF_COMMAND:-systemctl poweroff}
hold_seconds=${ABSCONDA_HOLD_SECONDS:-300}
identity=${ABSCONDA_IDENTITY:-}
metadata_url=${ABSCONDA_METADATA_URL:-http://metadata.google.internal}
workspaces_file=${ABSCONDA_WORKSPACES_FILE:-/var/lib/absconda-setup/workspaces}
proc=${ABSCONDA_PROC:-/proc}

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
case $identity in
'' | gce:*/*/*) ;;
*)
	log "ABSCONDA_IDENTITY must be empty or gce:PROJECT/ZONE/NAME, got '$identity'"
	exit 2
	;;
esac
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

if [ ! -e "$lease" ]; then
	# The startup script creates the lease owned by the SSH user; recreate it
	# the same way if someone removed it, so builds can still open it.
	: >>"$lease"
	chown "$(stat -c %u:%g "$workspace")" "$lease" 2>/dev/null || true
	chmod 0660 "$lease" 2>/dev/null || true
fi

# is_workspace DIR: an absolute folder with a regular (not symlinked) .lease
# and the `runs` folder every build creates.
is_workspace() {
	case $1 in
	/*) ;;
	*) return 1 ;;
	esac
	case $1 in
	*'
'*) return 1 ;;
	esac
	[ -d "$1/runs" ] && [ -f "$1/.lease" ] && [ ! -L "$1/.lease" ]
}

# Every workspace: the configured one, those seen before, those in use now.
all_workspaces() {
	printf '%s\n' "$workspace"
	if [ -f "$workspaces_file" ]; then
		cat "$workspaces_file"
	fi
	# Open files of every process; a lease in use is a link to WS/.lease.
	set +f
	set -- "$proc"/[0-9]*/fd
	set -f
	# `ls -l` shows them as `N -> TARGET` (GNU and busybox alike; find's
	# -lname and -printf are GNU only). Names with a newline are dropped.
	# shellcheck disable=SC2012
	ls -l "$@" 2>/dev/null | sed -n 's|^.* -> \(/.*\)/\.lease$|\1|p'
}

# Workspace names are split on newlines only, never globbed.
blanks=$(printf ' \t\nx')
blanks=${blanks%x}
newline=$(printf '\nx')
newline=${newline%x}
set -f
IFS=$newline

workspaces=$workspace
seen=
for ws in $(all_workspaces | sort -u); do
	if [ "$ws" = "$workspace" ] || ! is_workspace "$ws"; then
		continue
	fi
	workspaces="$workspaces
$ws"
	seen="$seen$ws
"
done
# Remember them, so their .last-used counts when nobody has them open.
if [ -n "$seen" ] && [ -d "$(dirname "$workspaces_file")" ]; then
	if ! { [ -f "$workspaces_file" ] && [ "$(sort -u "$workspaces_file")" = "$(printf '%s' "$seen" | sort -u)" ]; }; then
		if ! { printf '%s' "$seen" | sort -u >"$workspaces_file.new" && mv -f "$workspaces_file.new" "$workspaces_file"; }; then
			log "could not record the workspaces in $workspaces_file"
		fi
	fi
fi

# check_idle_and_power_off: runs with every lease held.
check_idle_and_power_off() {
	now=$(date +%s)
	boot_time=${ABSCONDA_BOOT_TIME:-}
	if [ -z "$boot_time" ]; then
		boot_time=$(sed -n 's/^btime \([0-9][0-9]*\)$/\1/p' /proc/stat)
	fi
	if ! is_whole_number "$boot_time"; then
		log "could not tell the boot time (got '$boot_time'); not powering off"
		return 1
	fi

	last_activity=$boot_time
	last_where=boot
	for ws in $workspaces; do
		if [ -e "$ws/.last-used" ]; then
			last_used_time=$(stat -c %Y "$ws/.last-used") || continue
			if [ "$last_used_time" -gt "$last_activity" ]; then
				last_activity=$last_used_time
				last_where=$ws
			fi
		fi
	done

	idle_seconds=$((now - last_activity))
	limit_seconds=$((idle_minutes * 60))
	if [ "$idle_seconds" -lt "$limit_seconds" ]; then
		return 0
	fi

	if [ -n "$identity" ] && ! is_this_instance; then
		return 1
	fi

	log "no build for $((idle_seconds / 60)) min (limit $idle_minutes min, last in $last_where): running '$poweroff_command'"
	# Word splitting on blanks is wanted here (the command and its
	# arguments); globbing is not (set -f above).
	IFS=$blanks
	# shellcheck disable=SC2086
	if ! $poweroff_command; then
		log "'$poweroff_command' failed; releasing the leases"
		return 1
	fi

	# Keep the leases until shutdown stops this service, so no build starts
	# on a machine that is going down.
	if [ "$hold_seconds" -gt 0 ]; then
		sleep "$hold_seconds"
	fi
	return 0
}

metadata() { # metadata PATH: one value from the GCE metadata server
	if command -v curl >/dev/null 2>&1; then
		curl -fsS -m 5 -H 'Metadata-Flavor: Google' "$metadata_url/computeMetadata/v1/$1"
	elif command -v wget >/dev/null 2>&1; then
		wget -qO- -T 5 --header 'Metadata-Flavor: Google' "$metadata_url/computeMetadata/v1/$1"
	else
		return 1
	fi
}

# is_this_instance: the metadata server names the project, zone and instance
# of ABSCONDA_IDENTITY. Anything else, an unreachable server included: no.
is_this_instance() {
	want=${identity#gce:}
	want_project=${want%%/*}
	want=${want#*/}
	want_zone=${want%%/*}
	want_name=${want#*/}
	if ! got_project=$(metadata project/project-id) ||
		! got_zone=$(metadata instance/zone) ||
		! got_name=$(metadata instance/name); then
		log "the metadata server did not confirm this is $identity; not powering off"
		return 1
	fi
	# instance/zone is projects/NUMBER/zones/ZONE.
	got_zone=${got_zone##*/}
	if [ "$got_project" != "$want_project" ] || [ "$got_zone" != "$want_zone" ] || [ "$got_name" != "$want_name" ]; then
		log "this is gce:$got_project/$got_zone/$got_name, not $identity; not powering off"
		return 1
	fi
	return 0
}

# hold_leases WS...: lock each workspace's lease without waiting, each in a
# subshell that keeps it open on fd 9 (read-only: nothing is created or
# truncated), then run the check with all of them held. Status 75: busy.
hold_leases() {
	if [ $# -eq 0 ]; then
		check_idle_and_power_off
		return
	fi
	(
		ws=$1
		shift
		if [ -L "$ws/.lease" ] || [ ! -f "$ws/.lease" ] || [ ! -r "$ws/.lease" ]; then
			log "cannot open $ws/.lease; not powering off"
			exit 1
		fi
		exec 9<"$ws/.lease"
		if ! flock -n 9; then
			exit 75
		fi
		hold_leases "$@"
	)
}

status=0
# shellcheck disable=SC2086 # one workspace a line, no blanks (is_workspace)
hold_leases $workspaces || status=$?
case $status in
0 | 75) exit 0 ;;
*) exit "$status" ;;
esac

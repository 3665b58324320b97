#!/bin/sh
# Runs the builder setup script (infra/scripts/builder-setup.sh.tftpl, rendered
# by Terraform the way infra/aws and infra/gcp render it) in throwaway roots:
# overlays of this machine's / inside a private mount namespace, where
# apt-get, apt-cache, dpkg, dpkg-query, docker, systemctl, iptables and curl
# are stubs that record their arguments and keep just enough state (package
# states, firewall rules) to answer like the real ones. sshd and sudo are the
# real ones. Checks what a builder gets at its first boot, that a second boot
# changes nothing, that a new configuration is applied, that a setup that
# fails half-way has already installed the idle watchdog, recovery from an
# install a poweroff interrupted, a dpkg lock held at boot (waited for, with a
# bound), a missing buildx (a loud failure), the poweroff rule whoever creates
# the user first, and the sshd hardening.
#
# Nothing outside the namespace is touched. Needs root, unshare(1), overlayfs,
# terraform, ssh-keygen, sshd; visudo and sudo (package sudo); shellcheck.
#
# Usage: sh tests/terraform/setup_script_test.sh
#
# shellcheck disable=SC2317 # helpers are called through check()
set -eu

# ---------------------------------------------------------------------------
# Inside the namespace: run one scenario and check its results.
# ---------------------------------------------------------------------------
if [ "${1:-}" = --inside ]; then
	tmp=$2
	repo=$3

	passed=0
	failed=0
	ok() {
		passed=$((passed + 1))
		echo "ok - $1"
	}
	not_ok() {
		failed=$((failed + 1))
		echo "not ok - $1"
	}
	check() { # check NAME COMMAND...
		name=$1
		shift
		if "$@"; then ok "$name"; else not_ok "$name"; fi
	}

	# new_root DIR: an overlay of / at DIR/m, with stubs in /stubs.
	new_root() {
		r=$1
		mkdir -p "$r"
		mount -t tmpfs tmpfs "$r"
		mkdir -p "$r/u" "$r/w" "$r/m"
		mount -t overlay overlay -o "lowerdir=/,upperdir=$r/u,workdir=$r/w" "$r/m"
		m=$r/m
		mount -t proc proc "$m/proc"
		mount -t tmpfs tmpfs "$m/dev"
		for d in null zero urandom random; do
			: >"$m/dev/$d"
			mount --bind "/dev/$d" "$m/dev/$d"
		done
		mount -t tmpfs tmpfs "$m/tmp"
		mkdir -p "$m/stubs"
		cat >"$m/stubs/systemctl" <<'EOF'
#!/bin/sh
echo "systemctl $*" >>/stub.log
EOF
		# Package states live in /dpkg-status, one `PACKAGE STATE` a line.
		cat >"$m/stubs/apt-get" <<'EOF'
#!/bin/sh
echo "apt-get $*" >>/stub.log
if [ -e /fail-apt ]; then exit 100; fi
case " $* " in
*" install "*)
	cp /stubs/docker.real /usr/bin/docker
	grep -v '^docker' /dpkg-status >/dpkg-status.new 2>/dev/null
	printf 'docker.io ii\ndocker-buildx ii\n' >>/dpkg-status.new
	mv /dpkg-status.new /dpkg-status
	;;
esac
EOF
		cat >"$m/stubs/apt-cache" <<'EOF'
#!/bin/sh
echo "apt-cache $*" >>/stub.log
if [ -e /no-buildx-package ] && [ "$*" = "show docker-buildx" ]; then exit 100; fi
EOF
		# dpkg: /dpkg-locked holds the number of calls that find the lock
		# held ("forever": all); --configure -a configures what is unpacked.
		cat >"$m/stubs/dpkg" <<'EOF'
#!/bin/sh
echo "dpkg $*" >>/stub.log
if [ -s /dpkg-locked ]; then
	n=$(cat /dpkg-locked)
	if [ "$n" != forever ]; then
		if [ "$n" -le 1 ]; then rm -f /dpkg-locked; else echo $((n - 1)) >/dpkg-locked; fi
	fi
	echo "dpkg: error: dpkg frontend lock was locked by another process with pid 4242" >&2
	exit 2
fi
if [ "$*" = "--configure -a" ] && [ -f /dpkg-status ]; then
	sed 's/ i[UFHWt]$/ ii/' /dpkg-status >/dpkg-status.new && mv /dpkg-status.new /dpkg-status
fi
EOF
		# dpkg-query -W -f=FORMAT [PACKAGE]: only the formats the script uses.
		cat >"$m/stubs/dpkg-query" <<'EOF'
#!/bin/sh
echo "dpkg-query $*" >>/stub.log
format=${2#-f=}
touch /dpkg-status
if [ -n "${3:-}" ]; then
	state=$(awk -v p="$3" '$1 == p { print $2 }' /dpkg-status)
	[ -n "$state" ] || { echo "dpkg-query: no packages found matching $3" >&2; exit 1; }
	printf '%s ' "$state"
	exit 0
fi
case $format in
*Package*) awk '{ print $2 " " $1 }' /dpkg-status ;;
esac
EOF
		# The docker CLI apt-get installs: buildx works unless /no-buildx.
		cat >"$m/stubs/docker.real" <<'EOF'
#!/bin/sh
if [ "$1 ${2:-}" = "buildx version" ]; then
	[ ! -e /no-buildx ] || { echo "docker: 'buildx' is not a docker command." >&2; exit 1; }
	echo "github.com/docker/buildx 0.14.1"
	exit 0
fi
echo fake docker
EOF
		# iptables/ip6tables: -L/-N/-C/-I against a rule file per program.
		cat >"$m/stubs/iptables" <<'EOF'
#!/bin/sh
echo "$(basename "$0") $*" >>/stub.log
rules=/$(basename "$0").rules
touch "$rules"
while [ "$1" = -w ] || [ "$1" = -n ]; do shift; done
op=$1
chain=$2
shift 2
case $op in
-L) grep -qx "chain $chain" "$rules" || [ "$chain" = FORWARD ] ;;
-N) echo "chain $chain" >>"$rules" ;;
-C) grep -qxF -- "$chain $*" "$rules" ;;
-I) shift; echo "$chain $*" >>"$rules" ;;
*) exit 2 ;;
esac
EOF
		cp "$m/stubs/iptables" "$m/stubs/ip6tables"
		# curl: records the call; /fail-curl makes it fail as curl -f does.
		cat >"$m/stubs/curl" <<'EOF'
#!/bin/sh
echo "curl $*" >>/stub.log
[ ! -e /fail-curl ] || exit 22
EOF
		chmod +x "$m/stubs/"*
		# A fresh image: no Docker yet, host keys of its own, no SSH user,
		# and cloud-init's sshd drop-in turning passwords on.
		chroot "$m" /bin/sh -c '
			rm -f /usr/bin/docker /usr/local/bin/docker /bin/docker
			rm -f /etc/ssh/ssh_host_* /etc/ssh/sshd_config.d/*
			mkdir -p /etc/ssh/sshd_config.d && ssh-keygen -A >/dev/null
			echo "PasswordAuthentication yes" >/etc/ssh/sshd_config.d/50-cloud-init.conf
			userdel -r absconda >/dev/null 2>&1 || true
			: >/dpkg-status
		'
	}

	# boot SCRIPT: run a rendered setup script as root in the current root.
	boot() {
		cp "$1" "$m/setup.sh"
		: >"$m/stub.log"
		set +e
		chroot "$m" /usr/bin/env -i \
			PATH=/stubs:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
			ABSCONDA_SETUP_RETRY_STEP=0 ABSCONDA_SETUP_LOCK_STEP=0 \
			/bin/sh /setup.sh >"$tmp/boot.out" 2>&1
		boot_status=$?
		set -e
	}

	stub_called() { grep -qxF -- "$1" "$m/stub.log"; }
	# sshd's effective configuration (`sshd -T`) has this line.
	sshd_effective() { chroot "$m" sh -c 'mkdir -p /run/sshd; sshd -T' 2>/dev/null | grep -qx "$1"; }
	# sudo itself says whether absconda may run poweroff without a password.
	may_poweroff() { chroot "$m" sudo -n -l -U absconda /usr/sbin/poweroff >/dev/null 2>&1; }
	stub_log_has() { grep -q -- "$1" "$m/stub.log"; }
	output_has() { grep -q -- "$1" "$tmp/boot.out"; }
	owner_mode() { chroot "$m" stat -c '%U:%G %a' "$1" 2>/dev/null; }
	count_key() { grep -cxF -- "$(cat "$tmp/key.pub")" "$m/home/absconda/.ssh/authorized_keys" 2>/dev/null || true; }

	fingerprints_ok() {
		sed -n '/^-----BEGIN ABSCONDA HOST KEY FINGERPRINTS-----$/,/^-----END ABSCONDA HOST KEY FINGERPRINTS-----$/p' \
			"$tmp/boot.out" >"$tmp/fp"
		lines=$(sed '1d;$d' "$tmp/fp")
		[ -n "$lines" ] || return 1
		# Every line: <algorithm> SHA256:<base64>, matching the image's keys.
		echo "$lines" | grep -qv '^[a-z0-9@.-]* SHA256:[A-Za-z0-9+/]*$' && return 1
		# shellcheck disable=SC2016 # expanded by the inner shell
		expected=$(chroot "$m" sh -c 'for k in /etc/ssh/ssh_host_*_key.pub; do ssh-keygen -l -E sha256 -f "$k" | cut -d" " -f2; done' | sort)
		actual=$(echo "$lines" | cut -d' ' -f2 | sort)
		[ "$expected" = "$actual" ]
	}

	# --- The rendered scripts pass shellcheck (POSIX sh) -------------------------
	if command -v shellcheck >/dev/null 2>&1; then
		check "rendered setup scripts are shellcheck-clean" shellcheck -s sh "$tmp/aws.sh" "$tmp/gcp.sh" "$tmp/gcp-idle0.sh"
		check "watchdog and metadata guard are shellcheck-clean" shellcheck -s sh "$repo/infra/scripts/absconda-idle-watchdog.sh" "$repo/infra/scripts/absconda-metadata-guard.sh"
	elif [ "${CI:-}" = true ]; then
		not_ok "shellcheck is missing (scripts/install-test-deps.sh installs it)"
	else
		echo "ok - shellcheck not run: it is missing (apt-get install shellcheck) # SKIP"
	fi

	check "EC2 user data within 16 KB (got $(cat "$tmp/aws-user-data-bytes") bytes with a 4096-bit RSA key)" [ "$(cat "$tmp/aws-user-data-bytes")" -le 16384 ]

	# --- Scenario 1: EC2 render, first boot, second boot, new config ----------
	new_root "$tmp/root1"
	boot "$tmp/aws.sh"
	check "first boot succeeds" [ "$boot_status" -eq 0 ]
	check "ssh user created in the docker group" sh -c "chroot '$m' id -nG absconda | grep -qw docker"
	check "workspace owned by the ssh user, mode 750" [ "$(owner_mode /var/lib/absconda)" = "absconda:absconda 750" ]
	check "lease file owned by the ssh user, mode 660" [ "$(owner_mode /var/lib/absconda/.lease)" = "absconda:absconda 660" ]
	check "watchdog installed as shipped" cmp -s "$m/usr/local/sbin/absconda-idle-watchdog" "$repo/infra/scripts/absconda-idle-watchdog.sh"
	check "watchdog executable" [ "$(owner_mode /usr/local/sbin/absconda-idle-watchdog)" = "root:root 755" ]
	check "watchdog settings" [ "$(cat "$m/etc/absconda/idle-watchdog.env")" = "$(printf 'ABSCONDA_WORKSPACE=/var/lib/absconda\nABSCONDA_IDLE_MINUTES=45\nABSCONDA_IDENTITY=')" ]
	check "watchdog timer runs every minute" grep -qx 'OnUnitActiveSec=1min' "$m/etc/systemd/system/absconda-idle-watchdog.timer"
	check "watchdog service runs the script" grep -qx 'ExecStart=/usr/local/sbin/absconda-idle-watchdog' "$m/etc/systemd/system/absconda-idle-watchdog.service"
	check "watchdog timer enabled" stub_called "systemctl enable absconda-idle-watchdog.timer"
	check "Docker installed from the distribution with buildx" stub_log_has "install --no-install-recommends docker.io .*docker-buildx"
	check "a clean image needs no dpkg --configure" sh -c "! grep -q '^dpkg --configure' '$m/stub.log'"
	check "package state read with dpkg-query" stub_called "dpkg-query -W -f=\${db:Status-Abbrev} docker.io"
	check "host builds refused by the daemon" sh -c "tr -d ' \n' <'$m/etc/docker/daemon.json' | grep -q '\"entitlements\":{\"network-host\":false}'"
	check "metadata server closed to containers (IPv4)" grep -qxF "DOCKER-USER -d 169.254.169.254/32 -m comment --comment absconda-metadata-guard -j REJECT" "$m/iptables.rules"
	check "metadata server closed to containers (IPv6)" sh -c "grep -qxF 'DOCKER-USER -d fd00:ec2::254/128 -m comment --comment absconda-metadata-guard -j REJECT' '$m/ip6tables.rules' && grep -qxF 'DOCKER-USER -d fd20:ce::254/128 -m comment --comment absconda-metadata-guard -j REJECT' '$m/ip6tables.rules'"
	check "FORWARD goes through DOCKER-USER" grep -qxF "FORWARD -j DOCKER-USER" "$m/iptables.rules"
	check "guard runs before and after dockerd starts" sh -c "grep -qx 'ExecStartPre=/usr/local/sbin/absconda-metadata-guard' '$m/etc/systemd/system/docker.service.d/absconda-metadata-guard.conf' && grep -qx 'ExecStartPost=/usr/local/sbin/absconda-metadata-guard' '$m/etc/systemd/system/docker.service.d/absconda-metadata-guard.conf'"
	check "guard installed as shipped" cmp -s "$m/usr/local/sbin/absconda-metadata-guard" "$repo/infra/scripts/absconda-metadata-guard.sh"
	check "sshd drop-in read first" [ -f "$m/etc/ssh/sshd_config.d/00-absconda.conf" ]
	check "sshd: no passwords, despite cloud-init's drop-in" sshd_effective "passwordauthentication no"
	check "sshd: no keyboard-interactive" sshd_effective "kbdinteractiveauthentication no"
	check "sshd: no root login" sshd_effective "permitrootlogin no"
	check "sshd: public keys" sshd_effective "pubkeyauthentication yes"
	allow_users() { chroot "$m" sh -c 'sshd -T' 2>/dev/null | sed -n 's/^allowusers //p' | sort | tr '\n' ' '; }
	check "sshd: only the builder user and ubuntu" [ "$(allow_users)" = "absconda ubuntu " ]
	check "sshd: keepalive every 10 s" sshd_effective "clientaliveinterval 10"
	check "sshd: silent client dropped after 4 keepalives (within 50 s)" sshd_effective "clientalivecountmax 4"
	check "sshd reloaded" stub_called "systemctl try-reload-or-restart ssh.service"
	check "EC2 render publishes no guest attributes" sh -c "! grep -q '^curl' '$m/stub.log'"
	check "build cache limit in daemon.json" grep -q '"defaultKeepStorage": "7GB"' "$m/etc/docker/daemon.json"
	check "Docker restarted for the new daemon.json" stub_called "systemctl restart docker.service"
	check "key authorised once" [ "$(count_key)" = 1 ]
	check "authorized_keys private to the user" [ "$(owner_mode /home/absconda/.ssh/authorized_keys)" = "absconda:absconda 600" ]
	check "host key fingerprints printed between the markers" fingerprints_ok
	if chroot "$m" sh -c 'command -v visudo' >/dev/null 2>&1; then
		check "sudo poweroff allowed by a valid rule" sh -c "grep -qx 'absconda ALL=(root) NOPASSWD: /usr/sbin/poweroff, /usr/bin/systemctl poweroff' '$m/etc/sudoers.d/absconda-poweroff' && chroot '$m' visudo -c -q -f /etc/sudoers.d/absconda-poweroff"
		check "sudo lets the user created by the script power off" may_poweroff
	elif [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
		check "visudo is installed (CI: install sudo)" false
	else
		echo "ok - sudoers rule not checked: visudo is missing (install sudo) # SKIP"
	fi
	check "setup reports ready" output_has "absconda-setup: builder ready"

	boot "$tmp/aws.sh"
	check "second boot succeeds" [ "$boot_status" -eq 0 ]
	check "second boot installs nothing" sh -c "! grep -q '^apt-get' '$m/stub.log'"
	check "second boot restarts nothing" sh -c "! grep -Eq 'restart|reload' '$m/stub.log'"
	check "second boot adds no firewall rule twice" [ "$(grep -c 169.254.169.254 "$m/iptables.rules")" = 1 ]
	check "second boot keeps the key once" [ "$(count_key)" = 1 ]
	check "second boot prints the fingerprints again" fingerprints_ok
	check "no temporary files left" sh -c "! ls -a '$m/etc/docker' '$m/etc/systemd/system' '$m/etc/sudoers.d' '$m/usr/local/sbin' '$m/etc/absconda' | grep -Eq 'absconda-new|^\.absconda-poweroff\.'"

	boot "$tmp/gcp-idle0.sh"
	check "boot with idle shutdown disabled succeeds" [ "$boot_status" -eq 0 ]
	check "watchdog removed when disabled" sh -c "[ ! -e '$m/etc/systemd/system/absconda-idle-watchdog.timer' ] && [ ! -e '$m/usr/local/sbin/absconda-idle-watchdog' ] && [ ! -e '$m/etc/absconda/idle-watchdog.env' ]"
	check "watchdog timer disabled" stub_called "systemctl disable --now absconda-idle-watchdog.timer"
	check "GCE render leaves authorized_keys alone" [ "$(count_key)" = 1 ]
	check "new cache limit applied" grep -q '"defaultKeepStorage": "20GB"' "$m/etc/docker/daemon.json"

	# --- Scenario 2: no network (apt fails) on a fresh image -------------------
	new_root "$tmp/root2"
	: >"$m/fail-apt"
	boot "$tmp/aws.sh"
	check "setup without network fails" [ "$boot_status" -ne 0 ]
	check "failure is reported" output_has "absconda-setup: FAILED"
	check "watchdog already installed when setup fails" sh -c "[ -x '$m/usr/local/sbin/absconda-idle-watchdog' ] && grep -qx 'systemctl enable absconda-idle-watchdog.timer' '$m/stub.log'"
	check "apt retried before giving up" [ "$(grep -c ' update$' "$m/stub.log")" = 5 ]

	# --- Scenario 3: a poweroff interrupted the install on an earlier boot -----
	# docker.io is unpacked (its /usr/bin/docker in place) but not configured.
	new_root "$tmp/root3"
	cp "$m/stubs/docker.real" "$m/usr/bin/docker"
	printf 'docker.io iU\ndocker-buildx ii\n' >"$m/dpkg-status"
	boot "$tmp/aws.sh"
	check "interrupted install: boot succeeds" [ "$boot_status" -eq 0 ]
	check "interrupted install: dpkg --configure -a finishes it" stub_called "dpkg --configure -a"
	check "interrupted install: docker.io configured" grep -qx "docker.io ii" "$m/dpkg-status"
	check "interrupted install: reported" output_has "finishing an interrupted package installation: docker.io"

	# An install interrupted before anything was configured, nothing usable.
	new_root "$tmp/root3b"
	printf 'docker.io iF\n' >"$m/dpkg-status"
	boot "$tmp/aws.sh"
	check "half-configured docker.io and no buildx: configured, then installed" sh -c "[ '$boot_status' -eq 0 ] && grep -qx 'dpkg --configure -a' '$m/stub.log' && grep -q '^apt-get .* install .*docker-buildx' '$m/stub.log'"

	# --- Scenario 4: the dpkg lock is held at boot ------------------------------
	new_root "$tmp/root4"
	printf 'docker.io iU\n' >"$m/dpkg-status"
	echo 3 >"$m/dpkg-locked"
	boot "$tmp/aws.sh"
	check "dpkg lock held for a while: boot succeeds" [ "$boot_status" -eq 0 ]
	check "dpkg lock held for a while: waited for it" output_has "waiting for the dpkg lock"
	check "dpkg lock held for a while: dpkg tried until it was free" [ "$(grep -cx 'dpkg --configure -a' "$m/stub.log")" = 4 ]
	check "apt-get waits for the lock as long" stub_log_has "apt-get -q -y -o DPkg::Lock::Timeout=900 "

	new_root "$tmp/root5"
	printf 'docker.io iU\n' >"$m/dpkg-status"
	echo forever >"$m/dpkg-locked"
	boot "$tmp/aws.sh"
	check "dpkg lock never freed: boot fails" [ "$boot_status" -ne 0 ]
	check "dpkg lock never freed: gives up after a bound" [ "$(grep -cx 'dpkg --configure -a' "$m/stub.log")" = 180 ]
	check "dpkg lock never freed: says so" output_has "the dpkg lock was still held after 0 s"
	check "dpkg lock never freed: watchdog already installed" [ -x "$m/usr/local/sbin/absconda-idle-watchdog" ]

	# --- Scenario 6: no buildx ----------------------------------------------------
	new_root "$tmp/root6"
	: >"$m/no-buildx-package"
	boot "$tmp/aws.sh"
	check "no docker-buildx package: boot fails" [ "$boot_status" -ne 0 ]
	check "no docker-buildx package: says so" output_has "ERROR: no docker-buildx package"
	check "no docker-buildx package: nothing installed half-way" sh -c "! grep -q '^apt-get .* install' '$m/stub.log'"

	new_root "$tmp/root6b"
	: >"$m/no-buildx"
	boot "$tmp/aws.sh"
	check "buildx not working after the install: boot fails" [ "$boot_status" -ne 0 ]
	check "buildx not working after the install: says so" output_has "ERROR: docker buildx does not run"

	# --- Scenario 7: GCE, the guest agent created the user first ----------------
	new_root "$tmp/root7"
	chroot "$m" sh -c 'groupadd -f google-sudoers && useradd -m -s /bin/bash -G google-sudoers absconda'
	boot "$tmp/gcp.sh"
	check "GCE boot succeeds" [ "$boot_status" -eq 0 ]
	check "GCE: sudo lets the agent's user power off" may_poweroff
	check "GCE: the agent's user joins the docker group" sh -c "chroot '$m' id -nG absconda | grep -qw docker"
	check "GCE: watchdog checks project, zone and name" grep -qx "ABSCONDA_IDENTITY=gce:team-proj/us-east1-b/builder" "$m/etc/absconda/idle-watchdog.env"
	check "GCE: sshd allows the builder user only" [ "$(allow_users)" = "absconda " ]
	host_keys_published() {
		for pub in "$m"/etc/ssh/ssh_host_*_key.pub; do
			algorithm=$(cut -d' ' -f1 "$pub")
			key=$(cut -d' ' -f2 "$pub")
			stub_called "curl -fsS -m 10 -X PUT -H Metadata-Flavor: Google --data $key http://metadata.google.internal/computeMetadata/v1/instance/guest-attributes/hostkeys/$algorithm" || return 1
		done
	}
	check "GCE: every host key published under hostkeys/" host_keys_published

	new_root "$tmp/root8"
	: >"$m/fail-curl"
	boot "$tmp/gcp.sh"
	check "GCE: host keys not publishable: boot fails" [ "$boot_status" -ne 0 ]
	check "GCE: host keys not publishable: says so" output_has "ERROR: could not publish the"
	check "GCE: the script's own user may power off" may_poweroff

	echo "$passed passed, $failed failed"
	if [ "$failed" -ne 0 ]; then
		echo "--- output of the last boot:"
		cat "$tmp/boot.out"
		exit 1
	fi
	exit 0
fi

# ---------------------------------------------------------------------------
# Outside: render the scripts, then re-run this file in a mount namespace.
# ---------------------------------------------------------------------------
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

skip_or_fail() {
	if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
		echo "setup_script_test: $1" >&2
		exit 1
	fi
	echo "setup_script_test: skipped: $1"
	exit 0
}
[ "$(id -u)" -eq 0 ] || skip_or_fail "needs root (mount namespaces and overlayfs)"
for tool in unshare terraform ssh-keygen chroot sshd sudo visudo; do
	command -v "$tool" >/dev/null 2>&1 || skip_or_fail "$tool is missing"
done
grep -qw overlay /proc/filesystems || skip_or_fail "overlayfs is not available"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

# The same templatefile() call as infra/aws/main.tf and infra/gcp/main.tf.
ssh-keygen -q -t ed25519 -N '' -C tester@example -f "$tmp/key" >/dev/null
mkdir "$tmp/render"
cat >"$tmp/render/main.tf" <<EOF
locals {
  template = "$repo/infra/scripts/builder-setup.sh.tftpl"
  watchdog = file("$repo/infra/scripts/absconda-idle-watchdog.sh")
  guard    = file("$repo/infra/scripts/absconda-metadata-guard.sh")
}

output "aws" {
  value = templatefile(local.template, {
    cloud                 = "aws"
    ssh_user              = "absconda"
    workspace             = "/var/lib/absconda"
    idle_shutdown_minutes = 45
    build_cache_gb        = 7
    authorized_key_b64    = base64encode(trimspace(file("$tmp/key.pub")))
    watchdog              = local.watchdog
    metadata_guard        = local.guard
    identity              = ""
    ssh_allow_users       = "absconda ubuntu"
  })
}

# The EC2 user data exactly as infra/aws/main.tf builds it: at most 16 KB.
output "aws_user_data_bytes" {
  value = length(join("\n", [
    "#cloud-config",
    yamlencode({
      write_files = [{
        path        = "/var/lib/cloud/scripts/per-boot/absconda-setup.sh"
        owner       = "root:root"
        permissions = "0700"
        encoding    = "gz+b64"
        content     = base64gzip(templatefile(local.template, {
          cloud                 = "aws"
          ssh_user              = "a-rather-long-user-name"
          workspace             = "/var/lib/a/rather/long/workspace/path"
          idle_shutdown_minutes = 45
          build_cache_gb        = 7
          authorized_key_b64    = base64encode("ssh-rsa $(printf 'A%.0s' $(seq 1 716)) someone@a-rather-long-host-name")
          watchdog              = local.watchdog
          metadata_guard        = local.guard
          identity              = ""
          ssh_allow_users       = "a-rather-long-user-name ubuntu"
        }))
      }]
    }),
  ]))
}

output "gcp" {
  value = templatefile(local.template, {
    cloud                 = "gcp"
    ssh_user              = "absconda"
    workspace             = "/var/lib/absconda"
    idle_shutdown_minutes = 30
    build_cache_gb        = 20
    authorized_key_b64    = ""
    watchdog              = local.watchdog
    metadata_guard        = local.guard
    identity              = "gce:team-proj/us-east1-b/builder"
    ssh_allow_users       = "absconda"
  })
}

output "gcp_idle0" {
  value = templatefile(local.template, {
    cloud                 = "gcp"
    ssh_user              = "absconda"
    workspace             = "/var/lib/absconda"
    idle_shutdown_minutes = 0
    build_cache_gb        = 20
    authorized_key_b64    = ""
    watchdog              = local.watchdog
    metadata_guard        = local.guard
    identity              = "gce:team-proj/us-east1-b/builder"
    ssh_allow_users       = "absconda"
  })
}
EOF
(
	cd "$tmp/render"
	terraform init -input=false >init.log 2>&1
	terraform apply -auto-approve -input=false >apply.log 2>&1
	terraform output -raw aws >"$tmp/aws.sh"
	terraform output -raw gcp >"$tmp/gcp.sh"
	terraform output -raw aws_user_data_bytes >"$tmp/aws-user-data-bytes"
	terraform output -raw gcp_idle0 >"$tmp/gcp-idle0.sh"
) || {
	cat "$tmp/render/"*.log >&2
	exit 1
}

unshare --mount --propagation private sh "$0" --inside "$tmp" "$repo"

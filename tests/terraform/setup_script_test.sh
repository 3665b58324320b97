#!/bin/sh
# Runs the builder setup script (infra/scripts/builder-setup.sh.tftpl, rendered
# by Terraform the way infra/aws and infra/gcp render it) in throwaway roots:
# overlays of this machine's / inside a private mount namespace, where
# apt-get, apt-cache, dpkg and systemctl are stubs that only record their
# arguments. Checks what a builder gets at its first boot, that a second boot
# changes nothing, that a new configuration is applied, and that a setup that
# fails half-way has already installed the idle watchdog.
#
# Nothing outside the namespace is touched. Needs root, unshare(1), overlayfs,
# terraform and ssh-keygen; visudo (package sudo) for the sudoers check.
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
		cat >"$m/stubs/apt-get" <<'EOF'
#!/bin/sh
echo "apt-get $*" >>/stub.log
if [ -e /fail-apt ]; then exit 100; fi
case " $* " in
*" install "*) printf '#!/bin/sh\necho fake docker\n' >/usr/bin/docker && chmod +x /usr/bin/docker ;;
esac
EOF
		cat >"$m/stubs/apt-cache" <<'EOF'
#!/bin/sh
echo "apt-cache $*" >>/stub.log
EOF
		cat >"$m/stubs/dpkg" <<'EOF'
#!/bin/sh
echo "dpkg $*" >>/stub.log
EOF
		chmod +x "$m/stubs/"*
		# A fresh image: no Docker yet, host keys of its own, no SSH user.
		chroot "$m" /bin/sh -c '
			rm -f /usr/bin/docker /usr/local/bin/docker /bin/docker
			rm -f /etc/ssh/ssh_host_*
			mkdir -p /etc/ssh && ssh-keygen -A >/dev/null
			userdel -r absconda >/dev/null 2>&1 || true
		'
	}

	# boot SCRIPT: run a rendered setup script as root in the current root.
	boot() {
		cp "$1" "$m/setup.sh"
		: >"$m/stub.log"
		set +e
		chroot "$m" /usr/bin/env -i \
			PATH=/stubs:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
			ABSCONDA_SETUP_RETRY_STEP=0 \
			/bin/sh /setup.sh >"$tmp/boot.out" 2>&1
		boot_status=$?
		set -e
	}

	stub_called() { grep -qxF -- "$1" "$m/stub.log"; }
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

	# --- Scenario 1: EC2 render, first boot, second boot, new config ----------
	new_root "$tmp/root1"
	boot "$tmp/aws.sh"
	check "first boot succeeds" [ "$boot_status" -eq 0 ]
	check "ssh user created in the docker group" sh -c "chroot '$m' id -nG absconda | grep -qw docker"
	check "workspace owned by the ssh user, mode 750" [ "$(owner_mode /var/lib/absconda)" = "absconda:absconda 750" ]
	check "lease file owned by the ssh user, mode 660" [ "$(owner_mode /var/lib/absconda/.lease)" = "absconda:absconda 660" ]
	check "watchdog installed as shipped" cmp -s "$m/usr/local/sbin/absconda-idle-watchdog" "$repo/infra/scripts/absconda-idle-watchdog.sh"
	check "watchdog executable" [ "$(owner_mode /usr/local/sbin/absconda-idle-watchdog)" = "root:root 755" ]
	check "watchdog settings" [ "$(cat "$m/etc/absconda/idle-watchdog.env")" = "$(printf 'ABSCONDA_WORKSPACE=/var/lib/absconda\nABSCONDA_IDLE_MINUTES=45')" ]
	check "watchdog timer runs every minute" grep -qx 'OnUnitActiveSec=1min' "$m/etc/systemd/system/absconda-idle-watchdog.timer"
	check "watchdog service runs the script" grep -qx 'ExecStart=/usr/local/sbin/absconda-idle-watchdog' "$m/etc/systemd/system/absconda-idle-watchdog.service"
	check "watchdog timer enabled" stub_called "systemctl enable absconda-idle-watchdog.timer"
	check "Docker installed from the distribution with buildx" stub_log_has "install --no-install-recommends docker.io .*docker-buildx"
	check "an interrupted dpkg run is finished first" stub_called "dpkg --configure -a"
	check "build cache limit in daemon.json" grep -q '"defaultKeepStorage": "7GB"' "$m/etc/docker/daemon.json"
	check "Docker restarted for the new daemon.json" stub_called "systemctl restart docker.service"
	check "key authorised once" [ "$(count_key)" = 1 ]
	check "authorized_keys private to the user" [ "$(owner_mode /home/absconda/.ssh/authorized_keys)" = "absconda:absconda 600" ]
	check "host key fingerprints printed between the markers" fingerprints_ok
	if chroot "$m" sh -c 'command -v visudo' >/dev/null 2>&1; then
		check "sudo poweroff allowed by a valid rule" sh -c "grep -qx 'absconda ALL=(root) NOPASSWD: /usr/sbin/poweroff, /usr/bin/systemctl poweroff' '$m/etc/sudoers.d/absconda-poweroff' && chroot '$m' visudo -c -q -f /etc/sudoers.d/absconda-poweroff"
	elif [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
		check "visudo is installed (CI: install sudo)" false
	else
		echo "ok - sudoers rule not checked: visudo is missing (install sudo) # SKIP"
	fi
	check "setup reports ready" output_has "absconda-setup: builder ready"

	boot "$tmp/aws.sh"
	check "second boot succeeds" [ "$boot_status" -eq 0 ]
	check "second boot installs nothing" sh -c "! grep -q '^apt-get' '$m/stub.log'"
	check "second boot restarts nothing" sh -c "! grep -Eq 'restart|daemon-reload' '$m/stub.log'"
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
for tool in unshare terraform ssh-keygen chroot; do
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
  watchdog = base64encode(file("$repo/infra/scripts/absconda-idle-watchdog.sh"))
}

output "aws" {
  value = templatefile(local.template, {
    cloud                 = "aws"
    ssh_user              = "absconda"
    workspace             = "/var/lib/absconda"
    idle_shutdown_minutes = 45
    build_cache_gb        = 7
    authorized_key_b64    = base64encode(trimspace(file("$tmp/key.pub")))
    watchdog_b64          = local.watchdog
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
    watchdog_b64          = local.watchdog
  })
}
EOF
(
	cd "$tmp/render"
	terraform init -input=false >init.log 2>&1
	terraform apply -auto-approve -input=false >apply.log 2>&1
	terraform output -raw aws >"$tmp/aws.sh"
	terraform output -raw gcp_idle0 >"$tmp/gcp-idle0.sh"
) || {
	cat "$tmp/render/"*.log >&2
	exit 1
}

unshare --mount --propagation private sh "$0" --inside "$tmp" "$repo"

#!/usr/bin/env bash
# Installs the programs absconda's tests and demo run on loopback: OpenSSH's
# sshd, dockerd, a docker registry, busybox (for a local base image), htpasswd,
# strace, curl, shellcheck (for the builder scripts), and Python's venv module
# (for moto's EC2 server).
# absconda itself needs none of these.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "$1" ]; }
have /usr/sbin/sshd || need+=(openssh-server)
have ssh-keygen || need+=(openssh-client)
have dockerd || need+=(docker.io)
have docker-registry || need+=(docker-registry)
have /bin/busybox || need+=(busybox-static)
have htpasswd || need+=(apache2-utils)
have strace || need+=(strace)
have tinyproxy || need+=(tinyproxy)
have danted || need+=(dante-server)
have curl || need+=(curl)
have ip || need+=(iproute2)
have visudo || need+=(sudo)
have unshare || need+=(util-linux)
have script || need+=(bsdutils)
have flock || need+=(util-linux)
have dash || need+=(dash)
have shellcheck || need+=(shellcheck)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing: ${need[*]}" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

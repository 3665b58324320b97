#!/usr/bin/env bash
# Builds absconda and runs it end to end on the bundled example
# (examples/hello): a loopback "builder" is set up first — OpenSSH's sshd,
# dockerd and a password-protected registry from Debian packages, all on
# 127.0.0.1 — then `absconda build --push` sends the context over SSH, builds
# and pushes it, and the script checks the registry and runs the image.
# Everything it starts is stopped again on exit.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
scripts/install-test-deps.sh
cargo build --release --quiet
absconda="$repo/target/release/absconda"

work=$(mktemp -d /tmp/absconda-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # what, command...
  local what=$1; shift
  for _ in $(seq 1 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "demo: $what did not come up" >&2; exit 1
}

echo "demo: starting dockerd, a registry and sshd on loopback (in $work)" >&2
docker_cli=/usr/bin/docker   # docker.io's client, matching its daemon
export DOCKER_HOST="unix://$work/docker.sock"
dockerd --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
  --data-root "$work/docker" --exec-root "$work/docker-exec" --pidfile "$work/docker.pid" \
  -H "$DOCKER_HOST" >"$work/dockerd.log" 2>&1 &
pids+=($!)
wait_for dockerd "$docker_cli" version

mkdir -p "$work/rootfs/bin"
cp /bin/busybox "$work/rootfs/bin/"
for c in sh cat echo ls; do ln -s busybox "$work/rootfs/bin/$c"; done
tar -C "$work/rootfs" -c . | "$docker_cli" import - local/busybox:latest >/dev/null

reg_port=$(port)
reg_user=demo
reg_password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
printf '%s' "$reg_password" | htpasswd -iBc "$work/htpasswd" "$reg_user" 2>/dev/null
cat >"$work/registry.yml" <<YAML
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$reg_port}
auth: {htpasswd: {realm: demo, path: $work/htpasswd}}
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
wait_for registry curl -s "http://127.0.0.1:$reg_port/v2/"

ssh_port=$(port)
ssh-keygen -q -t ed25519 -N '' -C '' -f "$work/hostkey"
ssh-keygen -q -t ed25519 -N '' -C '' -f "$work/userkey"
cp "$work/userkey.pub" "$work/authorized_keys"
mkdir -p /run/sshd
cat >"$work/sshd_config" <<CONF
Port $ssh_port
ListenAddress 127.0.0.1
HostKey $work/hostkey
AuthorizedKeysFile $work/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PidFile $work/sshd.pid
SetEnv DOCKER_HOST=$DOCKER_HOST
CONF
/usr/sbin/sshd -D -e -f "$work/sshd_config" 2>"$work/sshd.log" &
pids+=($!)
wait_for sshd bash -c "echo > /dev/tcp/127.0.0.1/$ssh_port"
# The builder's host key, recorded the way an admin would after checking it.
echo "[127.0.0.1]:$ssh_port $(cut -d' ' -f1-2 "$work/hostkey.pub")" >"$work/known_hosts"

cat >"$work/absconda-remote.yaml" <<YAML
builders:
  local:
    provider: ssh
    host: 127.0.0.1
    port: $ssh_port
    user: $(id -un)
    identity_file: $work/userkey
    known_hosts: $work/known_hosts
    workspace: $work/workspace
    docker: $docker_cli
defaults:
  timeout: 600
YAML

image="127.0.0.1:$reg_port/examples/hello"
echo "demo: absconda build --remote-builder local --context examples/hello --repository $image --tag v1 --tag latest --push" >&2
ABSCONDA_REGISTRY_USER=$reg_user ABSCONDA_REGISTRY_PASSWORD=$reg_password \
  "$absconda" build --remote-config "$work/absconda-remote.yaml" --remote-builder local \
  --context examples/hello --repository "$image" --tag v1 --tag latest --push \
  --build-arg BASE_IMAGE=local/busybox:latest

echo "demo: the registry now lists:" >&2
printf 'user = "%s:%s"\n' "$reg_user" "$reg_password" | curl -s -K - "http://127.0.0.1:$reg_port/v2/examples/hello/tags/list"
echo
echo "demo: running the pushed image:" >&2
export DOCKER_CONFIG="$work/client-config"
echo "$reg_password" | "$docker_cli" login -u "$reg_user" --password-stdin "127.0.0.1:$reg_port" >/dev/null 2>&1
"$docker_cli" rmi -f "$image:v1" "$image:latest" >/dev/null
"$docker_cli" pull -q "$image:v1" >/dev/null
"$docker_cli" run --rm --network none "$image:v1"
echo "demo: done" >&2

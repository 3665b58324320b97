#!/bin/sh
# Checks infra/scripts/absconda-metadata-guard.sh with the real iptables, in
# network namespaces this test makes (and removes):
#
#   infra-mdg-ctr ──veth── infra-mdg-host ──veth── infra-mdg-meta
#   (a container,          (the builder: routes     (the metadata server,
#    172.31.250.2)          and forwards)             169.254.169.254:80)
#
# Before the guard the container reaches the metadata server through the
# host; after it, the container's packets are rejected in DOCKER-USER while
# the host itself still reaches the server. A second run adds nothing. Then
# the guard with stub iptables: a failure to install the IPv4 rule fails it
# (so Docker does not start), a host without working ip6tables is fine.
#
# Usage: sh tests/terraform/metadata_guard_test.sh
# Needs root, ip (iproute2), iptables, curl and busybox (httpd).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
guard=$here/../../infra/scripts/absconda-metadata-guard.sh

skip_or_fail() {
	if [ "${CI:-}" = true ]; then
		echo "metadata_guard_test: $1" >&2
		exit 1
	fi
	echo "metadata_guard_test: skipped: $1"
	exit 0
}
[ "$(id -u)" -eq 0 ] || skip_or_fail "needs root (network namespaces)"
for tool in ip iptables curl busybox; do
	command -v "$tool" >/dev/null 2>&1 || skip_or_fail "$tool is missing"
done

ctr=infra-mdg-ctr
host=infra-mdg-host
meta=infra-mdg-meta
tmp=$(mktemp -d)
server=
cleanup() {
	if [ -s "$tmp/httpd.pid" ]; then
		kill "$(cat "$tmp/httpd.pid")" 2>/dev/null || true
	fi
	if [ -n "$server" ]; then
		wait "$server" 2>/dev/null || true
	fi
	for ns in $ctr $host $meta; do ip netns del "$ns" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
# Left over by an interrupted run.
for ns in $ctr $host $meta; do ip netns del "$ns" 2>/dev/null || true; done

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

in_ns() { # in_ns NS COMMAND...
	ns=$1
	shift
	ip netns exec "$ns" "$@"
}

# --- The three namespaces -------------------------------------------------------
for ns in $ctr $host $meta; do
	ip netns add "$ns"
	in_ns "$ns" ip link set lo up
done
ip link add mdg-c0 netns "$ctr" type veth peer name mdg-h0 netns "$host"
ip link add mdg-h1 netns "$host" type veth peer name mdg-m0 netns "$meta"
in_ns "$ctr" sh -c 'ip addr add 172.31.250.2/30 dev mdg-c0 && ip link set mdg-c0 up && ip route add default via 172.31.250.1'
in_ns "$host" sh -c '
	ip addr add 172.31.250.1/30 dev mdg-h0 && ip link set mdg-h0 up
	ip addr add 172.31.251.1/30 dev mdg-h1 && ip link set mdg-h1 up
	ip route add 169.254.169.254/32 via 172.31.251.2
	sysctl -q -w net.ipv4.ip_forward=1'
in_ns "$meta" sh -c '
	ip addr add 172.31.251.2/30 dev mdg-m0 && ip link set mdg-m0 up
	ip addr add 169.254.169.254/32 dev lo
	ip route add default via 172.31.251.1'

mkdir -p "$tmp/www/computeMetadata/v1/instance/service-accounts/default"
echo "a-token" >"$tmp/www/computeMetadata/v1/instance/service-accounts/default/token"
# The server writes its own pid (`ip netns exec` may fork): that is what
# the cleanup stops.
# shellcheck disable=SC2016 # expanded by the inner shell
ip netns exec "$meta" sh -c 'echo $$ >"$1/httpd.pid"; exec busybox httpd -f -p 169.254.169.254:80 -h "$1/www"' httpd "$tmp" </dev/null >/dev/null 2>&1 &
server=$!

url=http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token
fetch() { in_ns "$1" curl -fsS --max-time 5 "$url" 2>/dev/null; }

# The server is up when the host reaches it (bounded wait, no fixed sleep).
deadline=$(($(date +%s) + 20))
until [ "$(fetch "$host")" = a-token ]; do
	if [ "$(date +%s)" -ge "$deadline" ]; then
		echo "metadata_guard_test: the stand-in metadata server did not come up" >&2
		exit 1
	fi
done

check "without the guard a container reaches the metadata server" [ "$(fetch "$ctr")" = a-token ]

# The guard before dockerd ever ran: no DOCKER-USER chain yet.
check "guard succeeds before Docker made its chains" in_ns "$host" sh "$guard"
check "DOCKER-USER exists" sh -c "ip netns exec $host iptables -n -L DOCKER-USER >/dev/null"
check "FORWARD jumps to DOCKER-USER" in_ns "$host" iptables -C FORWARD -j DOCKER-USER

started=$(date +%s)
check "a container cannot reach the metadata server" sh -c "! ip netns exec $ctr curl -fsS --max-time 5 $url >/dev/null 2>&1"
check "... and is refused at once, not left to time out" [ $(($(date +%s) - started)) -lt 4 ]
check "the host still reaches the metadata server" [ "$(fetch "$host")" = a-token ]
check "other destinations still forwarded" in_ns "$ctr" sh -c 'ping -c 1 -W 2 172.31.251.2 >/dev/null 2>&1 || busybox ping -c 1 -W 2 172.31.251.2 >/dev/null 2>&1'

rules_before=$(in_ns "$host" iptables -S | wc -l)
check "a second run succeeds" in_ns "$host" sh "$guard"
check "a second run adds no rule" [ "$(in_ns "$host" iptables -S | wc -l)" -eq "$rules_before" ]

# Docker appends its own rule to DOCKER-USER (`-j RETURN`); the guard's rule
# must stay before it, also when the guard runs after dockerd.
in_ns "$host" iptables -F DOCKER-USER
in_ns "$host" iptables -A DOCKER-USER -j RETURN
check "after dockerd's RETURN rule: guard succeeds" in_ns "$host" sh "$guard"
check "the reject rule comes first" sh -c "ip netns exec $host iptables -S DOCKER-USER | sed -n 2p | grep -q -- '-d 169.254.169.254/32 .*-j REJECT'"
check "a container still cannot reach it" sh -c "! ip netns exec $ctr curl -fsS --max-time 5 $url >/dev/null 2>&1"

# --- Faults, with stub iptables -----------------------------------------------
mkdir -p "$tmp/bin"
printf '#!/bin/sh\necho "iptables: Permission denied" >&2\nexit 4\n' >"$tmp/bin/broken"
printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/fine"
chmod +x "$tmp/bin/broken" "$tmp/bin/fine"
set +e
IPTABLES=$tmp/bin/broken IP6TABLES=$tmp/bin/fine sh "$guard" 2>"$tmp/err"
status=$?
set -e
check "IPv4 rule not installable: the guard fails (Docker stays down)" [ "$status" -ne 0 ]
check "... and says why" grep -q "could not block containers from the metadata server (IPv4)" "$tmp/err"
check "no working ip6tables: IPv4 alone is fine" env IPTABLES="$tmp/bin/fine" IP6TABLES="$tmp/bin/broken" sh "$guard"
check "no ip6tables at all: IPv4 alone is fine" env IPTABLES="$tmp/bin/fine" IP6TABLES=/nonexistent/ip6tables sh "$guard"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

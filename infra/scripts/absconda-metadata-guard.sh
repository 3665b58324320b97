#!/bin/sh
# absconda-metadata-guard: keep containers, and so every step of a
# `docker build`, away from the cloud metadata server.
#
# The metadata server (169.254.169.254, metadata.google.internal) hands the
# VM's service account token or instance role credentials to whoever asks,
# and on GCE takes guest attributes (where absconda reads the builder's SSH
# host keys). A Dockerfile's RUN step must reach neither. Their traffic leaves
# through a Docker bridge (docker0, br-*, also the container of a buildx
# docker-container builder) and so crosses the FORWARD chain, where Docker
# sends it through DOCKER-USER first. The rule below rejects it there; the
# host's own requests (guest agent, apt, absconda's self-stop) go through
# OUTPUT and are not touched. Builds with `--network host` are refused by
# the daemon (daemon.json: builder.entitlements.network-host = false).
#
# Installed by the setup script of infra/gcp and infra/aws, run before and
# after dockerd starts (a drop-in of docker.service) and at every boot.
# Idempotent; fails (and so keeps Docker from starting) when the IPv4 rule
# cannot be installed. IPv6 rules are added where ip6tables works.
#
# Environment: IPTABLES, IP6TABLES name the programs (tests use stubs).
set -eu

iptables=${IPTABLES:-iptables}
ip6tables=${IP6TABLES:-ip6tables}
chain=DOCKER-USER
tag=absconda-metadata-guard

log() {
	printf 'absconda-metadata-guard: %s\n' "$*" >&2
}

# guard PROGRAM ADDRESS: DOCKER-USER exists, FORWARD jumps to it, and its
# first rule rejects packets to ADDRESS.
guard() {
	ipt=$1
	address=$2
	if ! "$ipt" -w -n -L "$chain" >/dev/null 2>&1; then
		"$ipt" -w -N "$chain"
	fi
	if ! "$ipt" -w -C FORWARD -j "$chain" >/dev/null 2>&1; then
		"$ipt" -w -I FORWARD 1 -j "$chain"
	fi
	if ! "$ipt" -w -C "$chain" -d "$address" -m comment --comment "$tag" -j REJECT >/dev/null 2>&1; then
		"$ipt" -w -I "$chain" 1 -d "$address" -m comment --comment "$tag" -j REJECT
	fi
}

# GCE and EC2 both serve IPv4 metadata at this address.
if ! guard "$iptables" 169.254.169.254/32; then
	log "could not block containers from the metadata server (IPv4)"
	exit 1
fi

# EC2's IPv6 endpoint and GCE's, for Docker networks with IPv6 on.
if command -v "$ip6tables" >/dev/null 2>&1 && "$ip6tables" -w -n -L FORWARD >/dev/null 2>&1; then
	for address in fd00:ec2::254/128 fd20:ce::254/128; do
		if ! guard "$ip6tables" "$address"; then
			log "could not block containers from the metadata server at $address"
			exit 1
		fi
	done
fi
exit 0

#!/bin/sh
# absconda-azure-deallocate: deallocate this Azure VM through Azure Resource
# Manager with the VM's own managed identity.
#
# The idle watchdog runs it as its POWEROFF_COMMAND on Azure: powering off
# from inside leaves the VM allocated and billed, only ARM's deallocate stops
# the bill. It acts only when the instance metadata service confirms
# (compute/resourceId) that this is the VM it was made for. The token reaches
# curl on stdin (printf is a shell builtin), never in an argument.
#
# Environment:
#   ABSCONDA_AZURE_VM_ID       the VM's resource id (required)
#   ABSCONDA_AZURE_CLIENT_ID   the user-assigned identity's client id
#   ABSCONDA_METADATA_URL      IMDS (default http://169.254.169.254)
#   ABSCONDA_ARM_ENDPOINT      ARM (default https://management.azure.com)
set -eu

want=${ABSCONDA_AZURE_VM_ID:?ABSCONDA_AZURE_VM_ID is not set}
client_id=${ABSCONDA_AZURE_CLIENT_ID:-}
imds=${ABSCONDA_METADATA_URL:-http://169.254.169.254}
arm=${ABSCONDA_ARM_ENDPOINT:-https://management.azure.com}

log() {
	printf 'absconda-azure-deallocate: %s\n' "$*" >&2
}

lower() {
	printf '%s' "$1" | tr 'A-Z' 'a-z'
}

if ! got=$(curl -fsS -m 5 -H 'Metadata: true' "$imds/metadata/instance/compute/resourceId?api-version=2021-02-01&format=text"); then
	log "the instance metadata service did not say which VM this is; not deallocating"
	exit 1
fi
if [ "$(lower "$got")" != "$(lower "$want")" ]; then
	log "this is $got, not $want; not deallocating"
	exit 1
fi

tok=$(curl -fsS -m 10 -H 'Metadata: true' \
	"$imds/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F${client_id:+&client_id=$client_id}" |
	sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p') || tok=
if [ -z "$tok" ]; then
	log "no managed identity token from the instance metadata service"
	exit 1
fi

if ! printf 'Authorization: Bearer %s\n' "$tok" |
	curl -fsS -m 30 -X POST -H @- -H 'Content-Length: 0' -o /dev/null \
		"$arm$want/deallocate?api-version=2024-07-01"; then
	log "the ARM deallocate request failed (does the identity hold the deallocate role on this VM?)"
	exit 1
fi
log "deallocation of $want requested"

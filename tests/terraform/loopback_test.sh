#!/bin/sh
# Runs the loopback test module through the cycle absconda drives
# (init, apply with -var, output -json, destroy) in a temporary copy, offline.
#
# Usage: sh tests/terraform/loopback_test.sh
set -eu

here=$(cd "$(dirname "$0")" && pwd)
if ! command -v terraform >/dev/null 2>&1; then
	echo "loopback_test: terraform is not installed" >&2
	exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
cp "$here/loopback/main.tf" "$tmp/"
cd "$tmp"

passed=0
failed=0
check() { # check NAME ACTUAL EXPECTED
	if [ "$2" = "$3" ]; then
		passed=$((passed + 1))
		echo "ok - $1"
	else
		failed=$((failed + 1))
		echo "not ok - $1 (got '$2', expected '$3')"
	fi
}

terraform init -input=false >init.log 2>&1
terraform apply -auto-approve -input=false \
	-var address=127.0.0.1 -var port=2222 -var ssh_user=tester \
	-var 'allowed_ssh_cidr=["127.0.0.1/32"]' -var spot=true \
	-var idle_shutdown_minutes=0 -var disk_size=30 >apply.log 2>&1

check "instance_ip is the address" "$(terraform output -raw instance_ip)" 127.0.0.1
check "ssh_user is passed through" "$(terraform output -raw ssh_user)" tester
check "ssh_port is the port" "$(terraform output -raw ssh_port)" 2222
instance_id=$(terraform output -raw instance_id)
check "instance_id is set" "$([ -n "$instance_id" ] && echo yes || echo no)" yes
check "host_key_fingerprints is empty" "$(terraform output -json host_key_fingerprints)" "[]"
if terraform output -json >outputs.json && grep -q '"instance_ip"' outputs.json; then
	check "output -json lists the outputs" yes yes
else
	check "output -json lists the outputs" no yes
fi

terraform destroy -auto-approve -input=false >destroy.log 2>&1
check "destroy leaves no resources" "$(terraform state list | wc -l | tr -d ' ')" 0

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

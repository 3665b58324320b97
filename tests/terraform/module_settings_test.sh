#!/bin/sh
# Evaluates the plan-relevant expressions of infra/gcp and infra/aws offline:
# each module keeps its decisions (zone, firewall rules, IAM members, Spot
# request, replacement triggers) in a provider-free `settings` submodule,
# which `terraform test` plans here against tests/terraform/settings/*.tftest.hcl.
#
# Usage: sh tests/terraform/module_settings_test.sh
# Needs terraform (no provider, no network).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

if ! command -v terraform >/dev/null 2>&1; then
	if [ "${CI:-}" = true ]; then
		echo "module_settings_test: terraform is missing" >&2
		exit 1
	fi
	echo "module_settings_test: skipped: terraform is missing"
	exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

passed=0
failed=0
for cloud in gcp aws; do
	dir=$tmp/$cloud
	mkdir -p "$dir/tests"
	cp "$repo/infra/$cloud/settings/"*.tf "$dir/"
	cp "$here/settings/$cloud.tftest.hcl" "$dir/tests/"
	if (
		cd "$dir"
		terraform init -input=false -no-color >init.log 2>&1 &&
			terraform test -no-color >test.log 2>&1
	); then
		passed=$((passed + 1))
		echo "ok - infra/$cloud/settings: $(grep -c '^ *run .*\.\.\. pass$' "$dir/test.log") runs pass"
	else
		failed=$((failed + 1))
		echo "not ok - infra/$cloud/settings"
		cat "$dir/init.log" "$dir/test.log" 2>/dev/null | grep -v -e 'CLI configuration' -e terraformrc -e '^[│╷╵ ]*$'
	fi
done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

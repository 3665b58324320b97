#!/bin/sh
# Evaluates the plan-relevant expressions of infra/gcp and infra/aws offline:
# each module keeps its decisions (zone, firewall rules, IAM members, Spot
# request, replacement triggers) in a provider-free `settings` submodule,
# which `terraform test` plans here against tests/terraform/settings/*.tftest.hcl.
#
# The whole modules cannot be validated without their providers; what can be
# checked offline is checked too: Terraform loads them (`terraform
# providers`: syntax, duplicate names, module calls), and every `var.`,
# `local.` and `module.settings.` they reference is declared.
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

# declared KIND FILE...: the names declared as `KIND "name"` (variable, output).
declared() {
	kind=$1
	shift
	sed -n "s/^$kind \"\([a-z0-9_]*\)\" {\$/\1/p" "$@" | sort -u
}
# referenced PREFIX FILE...: the names used as PREFIX.name.
referenced() {
	prefix=$1
	shift
	grep -v '^ *#' "$@" | grep -o "$prefix\.[a-z0-9_]*" | sed "s/^$prefix\.//" | sort -u
}
# locals FILE...: names assigned at two spaces of indentation in locals blocks.
locals_of() {
	awk '/^locals {/ { in_locals = 1; next } in_locals && /^}/ { in_locals = 0 } in_locals && /^  [a-z0-9_]+ *=/ { sub(/^  /, ""); sub(/ *=.*/, ""); print }' "$@" | sort -u
}

for cloud in gcp aws; do
	mod=$repo/infra/$cloud
	declared variable "$mod"/*.tf >"$tmp/vars.$cloud"
	locals_of "$mod"/*.tf >"$tmp/locals.$cloud"
	declared output "$mod"/settings/*.tf >"$tmp/settings.$cloud"
	missing=$(
		{
			referenced var "$mod"/*.tf | comm -23 - "$tmp/vars.$cloud" | sed 's/^/var./'
			referenced local "$mod"/*.tf | comm -23 - "$tmp/locals.$cloud" | sed 's/^/local./'
			referenced module.settings "$mod"/*.tf | comm -23 - "$tmp/settings.$cloud" | sed 's/^/module.settings./'
		}
	)
	if [ -z "$missing" ]; then
		passed=$((passed + 1))
		echo "ok - infra/$cloud: every var., local. and module.settings. reference is declared"
	else
		failed=$((failed + 1))
		echo "not ok - infra/$cloud: undeclared: $(echo "$missing" | tr '\n' ' ')"
	fi

	# Terraform loads the whole module (init may fail later, offline, when
	# it looks for the providers; loading the configuration comes first).
	dir=$tmp/load-$cloud
	cp -r "$repo/infra" "$dir"
	(cd "$dir/$cloud" && terraform init -backend=false -input=false -no-color >init.log 2>&1) || true
	if (cd "$dir/$cloud" && terraform providers -no-color >providers.log 2>&1); then
		passed=$((passed + 1))
		echo "ok - infra/$cloud loads (terraform providers)"
	else
		failed=$((failed + 1))
		echo "not ok - infra/$cloud loads (terraform providers)"
		grep -v -e 'CLI configuration' -e terraformrc -e '^[│╷╵ ]*$' "$dir/$cloud/providers.log"
	fi
done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

#!/usr/bin/env bash
# Runs absconda's whole test suite on a fresh machine: installs the programs the
# tests start on loopback (sshd, dockerd, registry, moto's EC2 server via a
# Python venv), then runs the Rust tests and the Terraform module checks.
# The test harness starts and stops every service itself.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
if command -v terraform >/dev/null 2>&1; then
  terraform fmt -check -recursive infra/ tests/terraform/
  sh tests/terraform/watchdog_test.sh
  sh tests/terraform/module_settings_test.sh
  sh tests/terraform/loopback_test.sh
  sh tests/terraform/setup_script_test.sh
  sh tests/terraform/metadata_guard_test.sh
elif [ "${CI:-}" = true ]; then
  echo "terraform is required in CI" >&2
  exit 1
else
  echo "SKIPPED: terraform is not installed; the Terraform checks did not run" >&2
fi
cargo test --all-targets "$@"

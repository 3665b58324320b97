#!/usr/bin/env bash
# Runs absconda's whole test suite on a fresh machine: installs the programs the
# tests start on loopback (sshd, dockerd, registry, dash, busybox, sudo, moto's
# EC2 server via a Python venv), then runs the Rust tests and the Terraform
# module checks, and ends with one line: `N passed, N failed, N skipped`.
# The test harness starts and stops every service itself. CI=true or CI=1
# turns every missing program into a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh || exit 1
ci=false
case "${CI:-}" in true|1) ci=true ;; esac
log=$(mktemp)
trap 'rm -f "$log"' EXIT
tf_failed=0 tf_skipped=0 tf_passed=0
if command -v terraform >/dev/null 2>&1; then
  for check in "terraform fmt -check -recursive infra/ tests/terraform/" \
    "sh tests/terraform/watchdog_test.sh" "sh tests/terraform/module_settings_test.sh" \
    "sh tests/terraform/loopback_test.sh" "sh tests/terraform/setup_script_test.sh" \
    "sh tests/terraform/metadata_guard_test.sh"; do
    if $check; then tf_passed=$((tf_passed + 1)); else
      echo "FAILED: $check" >&2
      tf_failed=$((tf_failed + 1))
    fi
  done
else
  echo "terraform is not installed and no allowed registry carries a current build: install Terraform >= 1.4 from HashiCorp's releases onto PATH" >&2
  if [ "$ci" = true ]; then exit 1; fi
  echo "SKIPPED: the Terraform checks did not run" >&2
  tf_skipped=6
fi
# The whole run has a deadline; a single hung test fails sooner (the
# harness's watchdog names it).
timeout --kill-after=30 3300 cargo test --all-targets "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
# `test result: ok. 12 passed; 0 failed; 1 ignored; ...` per test binary;
# a test that skipped itself outside CI says `SKIPPED:` (and counts as passed).
read -r passed failed ignored < <(
  sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$log" |
    awk '{p+=$1; f+=$2; i+=$3} END {print p+0, f+0, i+0}'
)
selfskipped=$(grep -c '^SKIPPED:' "$log" || true)
# Helpers that other tests run in a child process are ignored on their own.
helpers=$(grep -c 'ignored, run in a child process by' "$log" || true)
ignored=$((ignored - helpers))
passed=$((passed + tf_passed - selfskipped))
[ "$passed" -ge 0 ] || passed=0
failed=$((failed + tf_failed))
skipped=$((ignored + selfskipped + tf_skipped))
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
  failed=1 # the run itself failed (build error, a hung test, the deadline)
fi
echo "$passed passed, $failed failed, $skipped skipped"
[ "$rc" -eq 0 ] && [ "$tf_failed" -eq 0 ]

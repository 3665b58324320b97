# Checks of infra/gcp/settings: the zone, firewall rules, Artifact Registry
# grants and external address the GCE module plans, for given inputs.
# Run by tests/terraform/module_settings_test.sh.

variables {
  name             = "absconda-builder"
  project          = "team-proj"
  region           = "us-east1"
  region_zones     = ["us-east1-d", "us-east1-b", "us-east1-c"]
  allowed_ssh_cidr = ["203.0.113.7/32"]
  iap_tunnel       = false
}

run "default_zone_is_the_first_zone_that_exists" {
  command = plan

  assert {
    condition     = output.zone == "us-east1-b"
    error_message = "zone: got ${output.zone}, want us-east1-b (us-east1 has no -a zone)"
  }
}

run "a_given_zone_wins" {
  command = plan

  variables {
    zone         = "us-east1-c"
    region_zones = []
  }

  assert {
    condition     = output.zone == "us-east1-c"
    error_message = "zone: got ${output.zone}"
  }
}

run "a_zone_of_another_region_is_refused" {
  command = plan

  variables {
    zone = "europe-west1-b"
  }

  expect_failures = [output.zone]
}

run "a_region_without_zones_is_refused" {
  command = plan

  variables {
    region_zones = []
  }

  expect_failures = [output.zone]
}

run "without_iap_ssh_only_from_the_ranges_and_everyone_else_denied" {
  command = plan

  assert {
    condition     = keys(output.firewall_rules) == ["allowed", "deny"]
    error_message = "rules: ${jsonencode(output.firewall_rules)}"
  }

  assert {
    condition = jsonencode(output.firewall_rules.allowed) == jsonencode({
      action        = "allow"
      description   = "SSH to the absconda builder absconda-builder, from the configured source ranges only"
      name          = "absconda-builder-ssh"
      priority      = 900
      source_ranges = ["203.0.113.7/32"]
    })
    error_message = "allowed rule: ${jsonencode(output.firewall_rules.allowed)}"
  }

  assert {
    condition = (
      output.firewall_rules.deny.action == "deny" &&
      output.firewall_rules.deny.priority == 1000 &&
      output.firewall_rules.deny.source_ranges == ["0.0.0.0/0"] &&
      output.firewall_rules.deny.name == "absconda-builder-ssh-deny"
    )
    error_message = "deny rule: ${jsonencode(output.firewall_rules.deny)}"
  }

  assert {
    condition     = output.external_ip == true
    error_message = "without iap_tunnel the VM has an external address by default"
  }
}

run "with_iap_the_iap_range_is_allowed_before_the_deny" {
  command = plan

  variables {
    iap_tunnel = true
  }

  assert {
    condition     = keys(output.firewall_rules) == ["allowed", "deny", "iap"]
    error_message = "rules: ${jsonencode(output.firewall_rules)}"
  }

  assert {
    condition = (
      output.firewall_rules.iap.action == "allow" &&
      output.firewall_rules.iap.source_ranges == ["35.235.240.0/20"] &&
      output.firewall_rules.iap.priority < output.firewall_rules.deny.priority &&
      output.firewall_rules.iap.name == "absconda-builder-ssh-iap"
    )
    error_message = "iap rule: ${jsonencode(output.firewall_rules.iap)}"
  }

  assert {
    condition     = output.external_ip == false
    error_message = "with iap_tunnel the VM has no external address by default"
  }
}

run "iap_alone_opens_no_port_to_the_internet" {
  command = plan

  variables {
    iap_tunnel       = true
    allowed_ssh_cidr = []
  }

  assert {
    condition     = keys(output.firewall_rules) == ["deny", "iap"]
    error_message = "rules: ${jsonencode(output.firewall_rules)}"
  }

  assert {
    condition = alltrue([
      for r in output.firewall_rules : r.action == "deny" || r.source_ranges == ["35.235.240.0/20"]
    ])
    error_message = "only IAP may be allowed: ${jsonencode(output.firewall_rules)}"
  }

  assert {
    condition     = output.external_ip == false
    error_message = "no external address with iap_tunnel alone"
  }
}

run "iap_with_an_external_address_when_asked" {
  command = plan

  variables {
    iap_tunnel       = true
    assign_public_ip = true
  }

  assert {
    condition     = output.external_ip == true
    error_message = "assign_public_ip = true wins"
  }
}

run "no_ranges_and_no_iap_is_refused" {
  command = plan

  variables {
    allowed_ssh_cidr = []
  }

  expect_failures = [output.firewall_rules]
}

run "no_push_rights_by_default" {
  command = plan

  assert {
    condition     = length(output.repository_grants) == 0
    error_message = "grants: ${jsonencode(output.repository_grants)}"
  }
}

run "push_rights_per_repository_never_the_project" {
  command = plan

  variables {
    push_repositories = [
      "us-east1/images",
      "projects/other-proj/locations/europe-west4/repositories/base",
    ]
  }

  assert {
    condition = jsonencode(output.repository_grants) == jsonencode({
      "us-east1/images" = {
        project    = "team-proj"
        location   = "us-east1"
        repository = "images"
        role       = "roles/artifactregistry.writer"
      }
      "projects/other-proj/locations/europe-west4/repositories/base" = {
        project    = "other-proj"
        location   = "europe-west4"
        repository = "base"
        role       = "roles/artifactregistry.writer"
      }
    })
    error_message = "grants: ${jsonencode(output.repository_grants)}"
  }
}

run "a_malformed_repository_is_refused" {
  command = plan

  variables {
    push_repositories = ["images"]
  }

  expect_failures = [var.push_repositories]
}

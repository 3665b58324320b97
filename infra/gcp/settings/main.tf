# The plan-relevant decisions of the GCE builder module, as plain
# expressions: which zone, which firewall rules, which Artifact Registry
# grants, whether the VM gets an external address. No provider and no
# resource, so tests/terraform/module_settings_test.sh evaluates them offline
# with `terraform test`; ../main.tf turns the outputs into resources.

variable "name" {
  description = "The builder's name (../variables.tf `name`)."
  type        = string
}

variable "project" {
  description = "Project of the builder."
  type        = string
}

variable "region" {
  description = "Region of the builder."
  type        = string
}

variable "zone" {
  description = "The zone asked for, or null to take the region's first zone."
  type        = string
  default     = null
}

variable "region_zones" {
  description = "Names of the region's zones (google_compute_zones); read only when zone is null."
  type        = list(string)
  default     = []
}

variable "allowed_ssh_cidr" {
  description = "IPv4 ranges allowed to reach tcp/22."
  type        = list(string)
}

variable "iap_tunnel" {
  description = "Let IAP's TCP forwarding range reach tcp/22."
  type        = bool
}

variable "assign_public_ip" {
  description = "true/false, or null for: an external address unless iap_tunnel."
  type        = bool
  default     = null
}

variable "push_repositories" {
  description = "Artifact Registry repositories the builder may push to: `LOCATION/REPOSITORY` or `projects/PROJECT/locations/LOCATION/repositories/REPOSITORY`."
  type        = list(string)
  default     = []

  validation {
    condition = alltrue([
      for r in var.push_repositories :
      can(regex("^[a-z0-9-]+/[a-z0-9][a-z0-9._-]*$", r)) || can(regex("^projects/[^/]+/locations/[a-z0-9-]+/repositories/[a-z0-9][a-z0-9._-]*$", r))
    ])
    error_message = "every push_repositories entry must be LOCATION/REPOSITORY (for example \"europe-west4/images\") or projects/PROJECT/locations/LOCATION/repositories/REPOSITORY."
  }
}

locals {
  # The source range of IAP's TCP forwarding, documented at
  # https://cloud.google.com/iap/docs/using-tcp-forwarding.
  iap_range = "35.235.240.0/20"

  # google_compute_zones lists a region's zones in no promised order, and not
  # every region has an `-a` zone (us-east1 and europe-west1 start at `b`).
  zone = var.zone != null ? var.zone : try(sort(var.region_zones)[0], null)

  allow_rules = merge(
    length(var.allowed_ssh_cidr) > 0 ? {
      allowed = {
        name          = "${var.name}-ssh"
        description   = "SSH to the absconda builder ${var.name}, from the configured source ranges only"
        priority      = 900
        action        = "allow"
        source_ranges = var.allowed_ssh_cidr
      }
    } : {},
    var.iap_tunnel ? {
      iap = {
        name          = "${var.name}-ssh-iap"
        description   = "SSH to the absconda builder ${var.name} through IAP TCP forwarding"
        priority      = 900
        action        = "allow"
        source_ranges = [local.iap_range]
      }
    } : {},
  )

  # The auto-created `default` network comes with `default-allow-ssh` (tcp/22
  # from anywhere, priority 65534). This rule outranks it for the builder, so
  # only the ranges allowed above (priority 900) reach SSH.
  deny_rule = {
    deny = {
      name          = "${var.name}-ssh-deny"
      description   = "SSH to the absconda builder ${var.name} from anywhere else: denied"
      priority      = 1000
      action        = "deny"
      source_ranges = ["0.0.0.0/0"]
    }
  }

  # "LOCATION/REPO" or the full resource name → project, location, repository.
  repositories = {
    for r in var.push_repositories : r => (
      can(regex("^projects/[^/]+/locations/[^/]+/repositories/[^/]+$", r)) ? {
        project    = split("/", r)[1]
        location   = split("/", r)[3]
        repository = split("/", r)[5]
        } : {
        project    = var.project
        location   = split("/", r)[0]
        repository = split("/", r)[1]
      }
    )
  }
}

output "zone" {
  description = "Zone of the builder."
  value       = local.zone

  precondition {
    condition     = local.zone != null
    error_message = "no zone: the region has no zones (is region right?); set zone."
  }

  precondition {
    condition     = local.zone == null || startswith(coalesce(local.zone, "-"), "${var.region}-")
    error_message = "zone must be a zone of region (\"${var.region}-…\")."
  }
}

output "firewall_rules" {
  description = "The SSH firewall rules, by key: `allowed` (allowed_ssh_cidr), `iap` (iap_tunnel), `deny` (everyone else)."
  value       = merge(local.allow_rules, local.deny_rule)

  precondition {
    condition     = length(local.allow_rules) > 0
    error_message = "nothing could reach SSH: list allowed_ssh_cidr ranges, or set iap_tunnel = true and connect with `tunnel: iap`."
  }
}

output "external_ip" {
  description = "Whether the VM gets an ephemeral external IPv4 address."
  value       = var.assign_public_ip != null ? var.assign_public_ip : !var.iap_tunnel
}

output "repository_grants" {
  description = "roles/artifactregistry.writer grants for the builder's service account, by repository."
  value = {
    for k, r in local.repositories : k => merge(r, { role = "roles/artifactregistry.writer" })
  }
}

# An absconda builder on Google Compute Engine: one Ubuntu LTS VM with Docker
# and BuildKit, a service account that may only push to Artifact Registry, and
# a firewall rule that lets SSH in from the configured ranges only.
#
# The VM sets itself up at every boot (../scripts/builder-setup.sh.tftpl) and
# powers itself off after idle_shutdown_minutes without a build
# (../scripts/absconda-idle-watchdog.sh). A powered-off GCE VM is TERMINATED:
# only its disk is billed until absconda starts it again.

# The region's zones, when no zone is given: the builder goes to the first
# one by name (not every region has an `-a` zone). Any status: a zone that is
# down for a while must not move (and so replace) the builder.
data "google_compute_zones" "region" {
  count   = var.zone == null ? 1 : 0
  project = var.project
  region  = var.region
}

# Zone, firewall rules, Artifact Registry grants and the external address,
# decided without a provider so tests/terraform can check them offline.
module "settings" {
  source = "./settings"

  name              = var.name
  project           = var.project
  region            = var.region
  zone              = var.zone
  region_zones      = var.zone == null ? data.google_compute_zones.region[0].names : []
  allowed_ssh_cidr  = var.allowed_ssh_cidr
  iap_tunnel        = var.iap_tunnel
  assign_public_ip  = var.assign_public_ip
  push_repositories = var.push_repositories
}

locals {
  zone        = module.settings.zone
  network_tag = var.name

  # Service account IDs are 6-30 characters and must not end with a hyphen.
  service_account_base = replace(substr(var.name, 0, 30), "/-+$/", "")
  service_account_id   = length(local.service_account_base) >= 6 ? local.service_account_base : "${local.service_account_base}-builder"

  ssh_public_key = trimspace(var.ssh_public_key)
  labels         = merge(var.labels, { managed-by = "absconda" })

  startup_script = templatefile("${path.module}/../scripts/builder-setup.sh.tftpl", {
    cloud                 = "gcp"
    ssh_user              = var.ssh_user
    workspace             = var.workspace
    idle_shutdown_minutes = var.idle_shutdown_minutes
    build_cache_gb        = var.build_cache_gb
    # GCE's guest agent creates ssh_user and installs its key from the
    # `ssh-keys` metadata below; the script does not touch authorized_keys.
    authorized_key_b64 = ""
    watchdog           = file("${path.module}/../scripts/absconda-idle-watchdog.sh")
    metadata_guard     = file("${path.module}/../scripts/absconda-metadata-guard.sh")
    # The idle watchdog powers off only this instance: project, zone and
    # name as the metadata server reports them.
    identity = "gce:${var.project}/${local.zone}/${var.name}"
    # The guest agent manages the GCE user's login (no `ubuntu` to allow).
    ssh_allow_users = var.ssh_user
  })
}

resource "google_service_account" "builder" {
  account_id   = local.service_account_id
  display_name = "absconda builder ${var.name}"
  description  = "Identity of the absconda builder VM ${var.name}: may push images to the Artifact Registry repositories in push_repositories, nothing else."
}

# Push rights on the listed repositories only, never on the whole project:
# whatever reaches the VM's token can push to these and nothing else. With
# no repositories the builder pushes with the credentials absconda forwards.
resource "google_artifact_registry_repository_iam_member" "push" {
  for_each = module.settings.repository_grants

  project    = each.value.project
  location   = each.value.location
  repository = each.value.repository
  role       = each.value.role
  member     = "serviceAccount:${google_service_account.builder.email}"
}

# SSH from allowed_ssh_cidr and, with iap_tunnel, from IAP's forwarding
# range (priority 900); from anywhere else denied (priority 1000), which also
# outranks the `default` network's `default-allow-ssh` (priority 65534).
resource "google_compute_firewall" "ssh" {
  for_each = module.settings.firewall_rules

  name        = each.value.name
  network     = var.network
  description = each.value.description
  direction   = "INGRESS"
  priority    = each.value.priority

  source_ranges = each.value.source_ranges
  target_tags   = [local.network_tag]

  dynamic "allow" {
    for_each = each.value.action == "allow" ? [1] : []
    content {
      protocol = "tcp"
      ports    = ["22"]
    }
  }

  dynamic "deny" {
    for_each = each.value.action == "deny" ? [1] : []
    content {
      protocol = "tcp"
      ports    = ["22"]
    }
  }
}

# The rules of earlier versions of this module keep their names and are not
# recreated.
moved {
  from = google_compute_firewall.ssh
  to   = google_compute_firewall.ssh["allowed"]
}

moved {
  from = google_compute_firewall.ssh_deny_others
  to   = google_compute_firewall.ssh["deny"]
}

resource "google_compute_instance" "builder" {
  name         = var.name
  zone         = local.zone
  machine_type = var.machine_type
  description  = "absconda remote builder"
  tags         = [local.network_tag]
  labels       = local.labels

  # Changing machine_type (or the service account) needs a stopped VM.
  # Changing zone, image, disk_size, disk_type, labels (they label the boot
  # disk too) or spot replaces the VM: a new boot disk, an empty build cache.
  allow_stopping_for_update = true

  boot_disk {
    auto_delete = true

    initialize_params {
      image  = var.image
      size   = var.disk_size
      type   = var.disk_type
      labels = local.labels
    }
  }

  network_interface {
    network    = var.network
    subnetwork = var.subnetwork

    # An ephemeral external address, released while the VM is stopped. None
    # by default with iap_tunnel: IAP reaches the internal address.
    dynamic "access_config" {
      for_each = module.settings.external_ip ? [1] : []
      content {}
    }
  }

  scheduling {
    provisioning_model  = var.spot ? "SPOT" : "STANDARD"
    preemptible         = var.spot
    automatic_restart   = !var.spot
    on_host_maintenance = var.spot ? "TERMINATE" : "MIGRATE"
    # A preempted Spot VM is stopped, not deleted: absconda starts it again.
    instance_termination_action = var.spot ? "STOP" : null
  }

  metadata = {
    # `startup-script` (not metadata_startup_script): a changed script is
    # applied in place and runs at the next boot, without replacing the VM.
    startup-script = local.startup_script

    # The guest agent creates ssh_user and installs this key; keys set for
    # the whole project do not open this VM, and OS Login stays off so the
    # key is what authenticates.
    ssh-keys               = "${var.ssh_user}:${local.ssh_public_key}"
    block-project-ssh-keys = "TRUE"
    enable-oslogin         = "FALSE"

    # The startup script publishes the SSH host keys under the guest
    # attribute path `hostkeys/` at every boot (the guest agent does so only
    # for keys it generated itself), where absconda reads them before it
    # first connects.
    enable-guest-attributes = "TRUE"
  }

  service_account {
    email = google_service_account.builder.email
    # Access is governed by the service account's IAM roles alone.
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = var.secure_boot
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  lifecycle {
    precondition {
      condition     = var.build_cache_gb < var.disk_size
      error_message = "build_cache_gb must be smaller than disk_size: the build cache lives on the boot disk."
    }
  }

  # The VM should be able to push as soon as it is up.
  depends_on = [google_artifact_registry_repository_iam_member.push]
}

# An absconda builder on Google Compute Engine: one Ubuntu LTS VM with Docker
# and BuildKit, a service account that may only push to Artifact Registry, and
# a firewall rule that lets SSH in from the configured ranges only.
#
# The VM sets itself up at every boot (../scripts/builder-setup.sh.tftpl) and
# powers itself off after idle_shutdown_minutes without a build
# (../scripts/absconda-idle-watchdog.sh). A powered-off GCE VM is TERMINATED:
# only its disk is billed until absconda starts it again.

locals {
  zone        = coalesce(var.zone, "${var.region}-a")
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
    watchdog_b64       = base64encode(file("${path.module}/../scripts/absconda-idle-watchdog.sh"))
  })
}

resource "google_service_account" "builder" {
  account_id   = local.service_account_id
  display_name = "absconda builder ${var.name}"
  description  = "Identity of the absconda builder VM ${var.name}: may push images to Artifact Registry, nothing else."
}

resource "google_project_iam_member" "artifact_registry_writer" {
  project = var.project
  role    = "roles/artifactregistry.writer"
  member  = "serviceAccount:${google_service_account.builder.email}"
}

resource "google_compute_firewall" "ssh" {
  name        = "${var.name}-ssh"
  network     = var.network
  description = "SSH to the absconda builder ${var.name}, from the configured source ranges only"
  direction   = "INGRESS"
  priority    = 900

  source_ranges = var.allowed_ssh_cidr
  target_tags   = [local.network_tag]

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }
}

# The auto-created `default` network comes with `default-allow-ssh` (tcp/22
# from anywhere, priority 65534). This rule outranks it for the builder, so
# only the ranges allowed above (priority 900) reach SSH, whatever else the
# network allows.
resource "google_compute_firewall" "ssh_deny_others" {
  name        = "${var.name}-ssh-deny"
  network     = var.network
  description = "SSH to the absconda builder ${var.name} from anywhere else: denied"
  direction   = "INGRESS"
  priority    = 1000

  source_ranges = ["0.0.0.0/0"]
  target_tags   = [local.network_tag]

  deny {
    protocol = "tcp"
    ports    = ["22"]
  }
}

resource "google_compute_instance" "builder" {
  name         = var.name
  zone         = local.zone
  machine_type = var.machine_type
  description  = "absconda remote builder"
  tags         = [local.network_tag]
  labels       = local.labels

  # Changing machine_type (or the service account) needs a stopped VM.
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

    # An ephemeral external address, released while the VM is stopped.
    dynamic "access_config" {
      for_each = var.assign_public_ip ? [1] : []
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

    # The guest agent publishes the SSH host keys under the guest attribute
    # path `hostkeys/`, where absconda reads them before it first connects.
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
  depends_on = [google_project_iam_member.artifact_registry_writer]
}

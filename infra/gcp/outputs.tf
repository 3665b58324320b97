# Outputs absconda reads with `terraform output -json` after `remote provision`.

output "instance_ip" {
  description = "Address absconda connects to over SSH: the ephemeral external IPv4 address, or the internal one without an external address (iap_tunnel, assign_public_ip = false). The external address changes at every start; absconda asks the Compute API for the current one."
  value       = module.settings.external_ip ? google_compute_instance.builder.network_interface[0].access_config[0].nat_ip : google_compute_instance.builder.network_interface[0].network_ip
}

output "instance_name" {
  description = "GCE instance name, for the Compute API (status, start, stop, guest attributes)."
  value       = google_compute_instance.builder.name
}

output "ssh_user" {
  description = "Login user on the builder."
  value       = var.ssh_user
}

output "host_key_fingerprints" {
  description = "Always empty on GCE: absconda reads the host keys themselves from the guest attributes under `hostkeys/`, which the startup script publishes at every boot (see README)."
  value       = []
}

output "project" {
  description = "Project of the builder."
  value       = var.project
}

output "zone" {
  description = "Zone of the builder."
  value       = google_compute_instance.builder.zone
}

output "workspace" {
  description = "Builder workspace directory."
  value       = var.workspace
}

output "service_account_email" {
  description = "Service account the builder runs as (roles/artifactregistry.writer on each of push_repositories, nothing else)."
  value       = google_service_account.builder.email
}

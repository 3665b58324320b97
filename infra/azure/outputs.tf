# Outputs absconda reads with `terraform output -json` after `remote provision`.

output "instance_ip" {
  description = "Address absconda connects to over SSH: the static public IP."
  value       = azurerm_public_ip.builder.ip_address
}

output "instance_name" {
  description = "VM name, for ARM (status, start, deallocate)."
  value       = azurerm_linux_virtual_machine.builder.name
}

output "vm_id" {
  description = "The VM's resource id, as the instance metadata service reports it."
  value       = azurerm_linux_virtual_machine.builder.id
}

output "ssh_user" {
  description = "Login user on the builder."
  value       = var.ssh_user
}

output "host_key_fingerprints" {
  description = "SHA256 fingerprint of the SSH host key Terraform made and cloud-init installed; absconda pins it."
  value       = [tls_private_key.host_ed25519.public_key_fingerprint_sha256]
}

output "resource_group" {
  description = "Resource group holding everything of the builder."
  value       = azurerm_resource_group.builder.name
}

output "identity_client_id" {
  description = "Client id of the builder's user-assigned managed identity (AcrPush on acr_id, deallocate on this VM)."
  value       = azurerm_user_assigned_identity.builder.client_id
}

output "workspace" {
  description = "Builder workspace directory."
  value       = var.workspace
}

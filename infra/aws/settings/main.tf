# The plan-relevant decisions of the EC2 builder module, as plain
# expressions: how a Spot builder is requested and what replaces the
# instance. No provider and no resource, so
# tests/terraform/module_settings_test.sh evaluates them offline with
# `terraform test`; ../main.tf turns the outputs into arguments.

variable "spot" {
  description = "Run as a Spot instance."
  type        = bool
}

variable "ssh_user" {
  description = "The builder's login user."
  type        = string
}

locals {
  # EC2 keeps the volume of an interrupted Spot instance only when the
  # request is persistent with interruption behaviour stop: a one-time
  # request is refused with "stop" (InvalidParameterCombination), and a
  # terminated builder loses its build cache.
  spot_options = var.spot ? {
    instance_interruption_behavior = "stop"
    spot_instance_type             = "persistent"
  } : null
}

output "spot_options" {
  description = "spot_options of instance_market_options, or null for On-Demand."
  value       = local.spot_options
}

output "replacement_triggers" {
  description = "Values whose change must replace the instance although the provider plans nothing (hashicorp/terraform-provider-aws#38141: spot true → false)."
  value = {
    market = var.spot ? "spot" : "on-demand"
  }
}

output "ssh_allow_users" {
  description = "sshd AllowUsers: the builder's user, and `ubuntu`, whose key the EC2 key pair installs for debugging."
  value       = join(" ", distinct([var.ssh_user, "ubuntu"]))
}

# Variables absconda fills from the builder's config (`remote provision`):
# subscription_id, resource_group, location (`region`), machine_type,
# disk_size, spot, allowed_ssh_cidr, ssh_user (`user`), ssh_public_key
# (`identity_file`), idle_shutdown_minutes, name (`vm_name`) and workspace.

variable "subscription_id" {
  description = "Azure subscription to create the builder in."
  type        = string
}

variable "resource_group" {
  description = "Resource group created for the builder (and destroyed with it)."
  type        = string
  default     = "absconda-builder"
}

variable "location" {
  description = "Azure region, for example \"westeurope\"."
  type        = string
  default     = "westeurope"
}

variable "machine_type" {
  description = "VM size."
  type        = string
  default     = "Standard_D4s_v5"
}

variable "disk_size" {
  description = "OS disk size in GB (images, build cache and contexts live there)."
  type        = number
  default     = 100

  validation {
    condition     = var.disk_size >= 30 && floor(var.disk_size) == var.disk_size
    error_message = "disk_size must be a whole number of GB, at least 30."
  }
}

variable "spot" {
  description = "Run as an Azure Spot VM (much cheaper, can be evicted). Eviction deallocates the VM; absconda starts it again when capacity is back."
  type        = bool
  default     = false
}

variable "allowed_ssh_cidr" {
  description = "CIDR ranges allowed to reach SSH (tcp/22), for example [\"203.0.113.7/32\"]. Required: there is no open-to-the-world default."
  type        = list(string)

  validation {
    condition     = length(var.allowed_ssh_cidr) > 0
    error_message = "allowed_ssh_cidr must list at least one CIDR range (for example your address as \"203.0.113.7/32\")."
  }

  validation {
    condition     = alltrue([for c in var.allowed_ssh_cidr : can(cidrhost(c, 0))])
    error_message = "every allowed_ssh_cidr entry must be a CIDR range such as \"203.0.113.7/32\"."
  }
}

variable "ssh_user" {
  description = "Login user on the builder. It owns the workspace and is in the docker group."
  type        = string
  default     = "absconda"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_-]{0,31}$", var.ssh_user)) && !contains(["root", "admin", "administrator"], var.ssh_user)
    error_message = "ssh_user must be a lowercase POSIX user name other than root or admin (Azure reserves them)."
  }
}

variable "ssh_public_key" {
  description = "The OpenSSH public key line to authorise for ssh_user (Azure accepts RSA and ED25519 keys)."
  type        = string

  validation {
    condition     = can(regex("^(ssh-ed25519|ssh-rsa) [A-Za-z0-9+/]+=*( [^\\r\\n]*)?$", trimspace(var.ssh_public_key)))
    error_message = "ssh_public_key must be one OpenSSH ssh-ed25519 or ssh-rsa public key line."
  }
}

variable "idle_shutdown_minutes" {
  description = "Deallocate the builder after this many minutes without a build. 0 disables the idle watchdog."
  type        = number
  default     = 30

  validation {
    condition     = var.idle_shutdown_minutes == 0 || (var.idle_shutdown_minutes >= 5 && floor(var.idle_shutdown_minutes) == var.idle_shutdown_minutes)
    error_message = "idle_shutdown_minutes must be 0 (disabled) or a whole number of at least 5."
  }
}

variable "name" {
  description = "VM name; prefix of the network, identity and role names."
  type        = string
  default     = "absconda-builder"

  validation {
    condition     = can(regex("^[A-Za-z0-9]([A-Za-z0-9-]{0,50}[A-Za-z0-9])?$", var.name))
    error_message = "name must be 1-52 letters, digits or hyphens, starting and ending with a letter or digit."
  }
}

variable "workspace" {
  description = "Builder workspace directory, owned by ssh_user."
  type        = string
  default     = "/var/lib/absconda"

  validation {
    condition     = can(regex("^(/[A-Za-z0-9._-]+)+$", var.workspace)) && !can(regex("(^|/)\\.\\.?(/|$)", var.workspace))
    error_message = "workspace must be an absolute path made of letters, digits, '.', '_' and '-' (no spaces, no '..')."
  }
}

variable "build_cache_gb" {
  description = "BuildKit garbage collection keeps the build cache under this many GB."
  type        = number
  default     = 20
}

variable "acr_id" {
  description = "Resource id of an Azure Container Registry the builder may push to (AcrPush for its managed identity); null for none."
  type        = string
  default     = null
}

variable "address_space" {
  description = "Address space of the builder's virtual network; the subnet is its first /24."
  type        = string
  default     = "10.42.0.0/16"
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}

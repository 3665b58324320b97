# Inputs of the GCE builder module. absconda passes the common ones with
# `-var NAME=VALUE` (names shared with infra/aws and tests/terraform/loopback);
# the rest keep their defaults unless a team sets them in a .tfvars file.

# --- Passed by absconda -------------------------------------------------------

variable "project" {
  description = "Google Cloud project ID to create the builder in."
  type        = string

  validation {
    condition     = length(trimspace(var.project)) > 0
    error_message = "project must name the Google Cloud project to create the builder in."
  }
}

variable "region" {
  description = "Region of the builder (the zone must be in it)."
  type        = string
  default     = "us-central1"
}

variable "zone" {
  description = "Zone of the builder. Default: the region's first zone by name, read from the Compute API at the first apply (not every region has an `-a` zone). Changing it replaces the VM."
  type        = string
  default     = null
}

variable "machine_type" {
  description = "GCE machine type of the builder."
  type        = string
  default     = "e2-standard-4"
}

variable "disk_size" {
  description = "Boot disk size in GB. It holds Docker's images and the build cache, and is billed while the builder is stopped."
  type        = number
  default     = 100

  validation {
    condition     = var.disk_size >= 20 && floor(var.disk_size) == var.disk_size
    error_message = "disk_size must be a whole number of GB, at least 20."
  }
}

variable "spot" {
  description = "Run as a Spot VM (much cheaper, can be preempted; a preempted builder is stopped, not deleted)."
  type        = bool
  default     = false
}

variable "allowed_ssh_cidr" {
  description = "IPv4 CIDR ranges allowed to reach SSH (tcp/22), for example [\"203.0.113.7/32\"]. Required: there is no open-to-the-world default. May be [] with iap_tunnel = true."
  type        = list(string)

  validation {
    condition     = alltrue([for c in var.allowed_ssh_cidr : can(cidrnetmask(c))])
    error_message = "every allowed_ssh_cidr entry must be an IPv4 CIDR range such as \"203.0.113.7/32\" (GCE firewall rules for this VM take IPv4 only)."
  }
}

variable "ssh_user" {
  description = "Login user on the builder. It owns the workspace and is in the docker group."
  type        = string
  default     = "absconda"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_-]{0,31}$", var.ssh_user)) && var.ssh_user != "root"
    error_message = "ssh_user must be a lowercase POSIX user name (at most 32 characters) other than root."
  }
}

variable "ssh_public_key" {
  description = "The OpenSSH public key line to authorise for ssh_user (the content of a .pub file)."
  type        = string

  validation {
    condition     = can(regex("^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\\.com|sk-ecdsa-sha2-nistp256@openssh\\.com) [A-Za-z0-9+/]+=*( [^\\r\\n]*)?$", trimspace(var.ssh_public_key)))
    error_message = "ssh_public_key must be one OpenSSH public key line, such as \"ssh-ed25519 AAAA... me@laptop\"."
  }
}

variable "idle_shutdown_minutes" {
  description = "Power the builder off after this many minutes without a build (no lease held). 0 disables the idle watchdog."
  type        = number
  default     = 30

  validation {
    condition     = var.idle_shutdown_minutes == 0 || (var.idle_shutdown_minutes >= 5 && floor(var.idle_shutdown_minutes) == var.idle_shutdown_minutes)
    error_message = "idle_shutdown_minutes must be 0 (disabled) or a whole number of at least 5, so a started builder has time to set itself up and take its first build."
  }
}

variable "name" {
  description = "Instance name; also names the firewall rules, the network tag and the service account."
  type        = string
  default     = "absconda-builder"

  validation {
    condition     = can(regex("^[a-z]([-a-z0-9]{0,52}[a-z0-9])?$", var.name))
    error_message = "name must be 1-54 lowercase letters, digits or hyphens, start with a letter and not end with a hyphen (the firewall rules add \"-ssh-deny\")."
  }
}

variable "workspace" {
  description = "Builder workspace directory, owned by ssh_user; holds .lease and .last-used."
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

  validation {
    condition     = var.build_cache_gb >= 1 && floor(var.build_cache_gb) == var.build_cache_gb
    error_message = "build_cache_gb must be a whole number of GB, at least 1."
  }
}

# --- GCE specifics --------------------------------------------------------------

variable "network" {
  description = "VPC network of the builder (name or self link)."
  type        = string
  default     = "default"
}

variable "subnetwork" {
  description = "Subnetwork of the builder; required for custom-mode networks, optional otherwise."
  type        = string
  default     = null
}

variable "assign_public_ip" {
  description = "Give the builder an ephemeral external IPv4 address (it changes at every start). Default: yes, unless iap_tunnel. Without one, instance_ip is the internal address and absconda must reach the VPC (`tunnel: iap`, VPN, jump host); the builder then also needs Cloud NAT to install Docker and pull base images."
  type        = bool
  default     = null
}

variable "iap_tunnel" {
  description = "Let IAP TCP forwarding (35.235.240.0/20) reach SSH, for `tunnel: iap`. The VM then gets no external address unless assign_public_ip = true, and allowed_ssh_cidr may be []: no port open to the internet."
  type        = bool
  default     = false
}

variable "push_repositories" {
  description = "Artifact Registry repositories the builder's service account may push to (roles/artifactregistry.writer on each repository, never on the project): \"LOCATION/REPOSITORY\" in this project, or \"projects/PROJECT/locations/LOCATION/repositories/REPOSITORY\". Default: none; absconda forwards your own registry credentials to each build."
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

variable "image" {
  description = "Boot image: Ubuntu LTS. Any image, family or self link the provider accepts; the startup script needs apt, systemd and cloud-image defaults."
  type        = string
  default     = "ubuntu-os-cloud/ubuntu-2404-lts-amd64"
}

variable "disk_type" {
  description = "Boot disk type."
  type        = string
  default     = "pd-balanced"
}

variable "labels" {
  description = "Extra labels for the instance and its disk."
  type        = map(string)
  default     = {}
}

variable "secure_boot" {
  description = "Shielded VM secure boot. Ubuntu's GCE images support it; turn it off only for an image that does not."
  type        = bool
  default     = true
}

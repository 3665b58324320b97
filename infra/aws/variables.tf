# Inputs of the EC2 builder module. absconda passes the common ones with
# `-var NAME=VALUE` (names shared with infra/gcp and tests/terraform/loopback);
# the rest keep their defaults unless a team sets them in a .tfvars file.

# --- Passed by absconda -------------------------------------------------------

variable "region" {
  description = "AWS region of the builder."
  type        = string
  default     = "us-east-1"
}

variable "zone" {
  description = "Availability zone of the builder, when subnet_id is not given (the subnet decides otherwise). Default: any zone of the default VPC."
  type        = string
  default     = null
}

variable "instance_type" {
  description = "EC2 instance type of the builder. Graviton types (arm64) get the arm64 Ubuntu AMI."
  type        = string
  default     = "t3.xlarge"
}

variable "disk_size" {
  description = "Root volume size in GB. It holds Docker's images and the build cache, and is billed while the builder is stopped."
  type        = number
  default     = 100

  validation {
    condition     = var.disk_size >= 20 && floor(var.disk_size) == var.disk_size
    error_message = "disk_size must be a whole number of GB, at least 20."
  }
}

variable "spot" {
  description = "Run as a Spot Instance (much cheaper, can be interrupted): a persistent Spot request whose interruption stops the instance instead of terminating it. See the README before destroying a Spot builder."
  type        = bool
  default     = false
}

variable "allowed_ssh_cidr" {
  description = "CIDR ranges (IPv4 or IPv6) allowed to reach SSH (tcp/22), for example [\"203.0.113.7/32\"]. Required: there is no open-to-the-world default."
  type        = list(string)

  validation {
    condition     = length(var.allowed_ssh_cidr) > 0
    error_message = "allowed_ssh_cidr must list at least one CIDR range (for example your address as \"203.0.113.7/32\")."
  }

  validation {
    condition     = alltrue([for c in var.allowed_ssh_cidr : can(cidrhost(c, 0))])
    error_message = "every allowed_ssh_cidr entry must be a CIDR range such as \"203.0.113.7/32\" or \"2001:db8::/64\"."
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
  description = "Name tag of the instance; prefix of the security group, key pair, IAM role and instance profile names."
  type        = string
  default     = "absconda-builder"

  validation {
    condition     = can(regex("^[A-Za-z0-9]([A-Za-z0-9-]{0,35}[A-Za-z0-9])?$", var.name))
    error_message = "name must be 1-37 letters, digits or hyphens, starting and ending with a letter or digit (IAM name prefixes are limited to 38 characters)."
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

# --- EC2 specifics --------------------------------------------------------------

variable "ami_id" {
  description = "AMI of the builder. Default: the newest Ubuntu 24.04 LTS server AMI published by Canonical (owner 099720109477) for the instance type's architecture. The startup script needs apt, systemd and cloud-init."
  type        = string
  default     = null
}

variable "vpc_id" {
  description = "VPC of the builder's security group. Default: the VPC of subnet_id, or the region's default VPC when no subnet is given."
  type        = string
  default     = null
}

variable "subnet_id" {
  description = "Subnet to launch the builder in. Default: a default subnet of the default VPC. Required with vpc_id."
  type        = string
  default     = null
}

variable "associate_public_ip" {
  description = "Give the builder a public IPv4 address (it changes at every start) when launched in subnet_id. Without subnet_id the default subnet's setting applies (public). Without one, instance_ip is the private address and absconda must reach the VPC; the builder then also needs a NAT gateway to install Docker."
  type        = bool
  default     = true
}

variable "volume_type" {
  description = "EBS volume type of the root volume."
  type        = string
  default     = "gp3"
}

variable "ecr_repository_arns" {
  description = "ECR repositories the builder may push to and pull from. Default: every repository of this account in the builder's region."
  type        = list(string)
  default     = null
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}

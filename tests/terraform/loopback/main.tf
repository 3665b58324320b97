# A stand-in for infra/gcp and infra/aws in absconda's tests: it provisions
# nothing but Terraform's built-in `terraform_data` resource, so `terraform
# init/apply/output -json/destroy` work offline, and points absconda at the
# loopback sshd the test harness runs.
#
# It declares every variable absconda may pass to any builder module, each
# with a default, so a test can pass any subset of them; the values are kept
# in the resource so `terraform show` reveals what absconda passed.
#
#   terraform init -input=false
#   terraform apply -auto-approve -input=false -var address=127.0.0.1 -var port=2222
#   terraform output -json
#   terraform destroy -auto-approve -input=false

terraform {
  required_version = ">= 1.5"
}

# --- Where the test sshd listens ------------------------------------------------

variable "address" {
  description = "Address of the test sshd, returned as instance_ip."
  type        = string
  default     = "127.0.0.1"
}

variable "port" {
  description = "Port of the test sshd, returned as ssh_port."
  type        = number
  default     = 22
}

# --- Variables of the real modules (accepted, recorded, otherwise unused) -------

variable "project" {
  type    = string
  default = ""
}

variable "region" {
  type    = string
  default = ""
}

variable "zone" {
  type    = string
  default = ""
}

variable "machine_type" {
  type    = string
  default = ""
}

variable "instance_type" {
  type    = string
  default = ""
}

variable "disk_size" {
  type    = number
  default = 10
}

variable "spot" {
  type    = bool
  default = false
}

variable "allowed_ssh_cidr" {
  type    = list(string)
  default = ["127.0.0.1/32"]
}

variable "ssh_user" {
  type    = string
  default = "absconda"
}

variable "ssh_public_key" {
  type    = string
  default = ""
}

variable "idle_shutdown_minutes" {
  type    = number
  default = 30
}

variable "name" {
  type    = string
  default = "absconda-builder"
}

variable "workspace" {
  type    = string
  default = "/var/lib/absconda"
}

variable "build_cache_gb" {
  type    = number
  default = 20
}

variable "network" {
  type    = string
  default = "default"
}

variable "subnetwork" {
  type    = string
  default = null
}

variable "image" {
  type    = string
  default = ""
}

variable "ami_id" {
  type    = string
  default = null
}

variable "vpc_id" {
  type    = string
  default = null
}

variable "subnet_id" {
  type    = string
  default = null
}

# --- The "builder" ------------------------------------------------------------------

resource "terraform_data" "builder" {
  input = {
    address               = var.address
    port                  = var.port
    project               = var.project
    region                = var.region
    zone                  = var.zone
    machine_type          = var.machine_type
    instance_type         = var.instance_type
    disk_size             = var.disk_size
    spot                  = var.spot
    allowed_ssh_cidr      = var.allowed_ssh_cidr
    ssh_user              = var.ssh_user
    ssh_public_key        = var.ssh_public_key
    idle_shutdown_minutes = var.idle_shutdown_minutes
    name                  = var.name
    workspace             = var.workspace
    build_cache_gb        = var.build_cache_gb
    network               = var.network
    subnetwork            = var.subnetwork
    image                 = var.image
    ami_id                = var.ami_id
    vpc_id                = var.vpc_id
    subnet_id             = var.subnet_id
  }
}

# --- The outputs every builder module provides ----------------------------------------

output "instance_ip" {
  value = var.address
}

output "instance_id" {
  value = terraform_data.builder.id
}

output "instance_name" {
  description = "What infra/gcp outputs; here the name variable, for tests of GCE-flavoured builders."
  value       = var.name
}

output "ssh_user" {
  value = var.ssh_user
}

output "host_key_fingerprints" {
  value = []
}

output "ssh_port" {
  description = "Port of the test sshd (the real modules always use 22 and do not output it)."
  value       = var.port
}

# An absconda builder on EC2: one Ubuntu LTS instance with Docker and
# BuildKit, an instance profile that may push to ECR, and a security group
# that lets SSH in from the configured ranges only.
#
# The instance sets itself up at every boot (../scripts/builder-setup.sh.tftpl,
# run by cloud-init as a per-boot script) and powers itself off after
# idle_shutdown_minutes without a build (../scripts/absconda-idle-watchdog.sh).
# instance_initiated_shutdown_behavior = "stop" makes that poweroff a stop, not
# a termination: only the EBS volume is billed until absconda starts it again.

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

# The instance type's architecture picks the AMI (x86_64 or Graviton).
data "aws_ec2_instance_type" "builder" {
  count         = var.ami_id == null ? 1 : 0
  instance_type = var.instance_type
}

locals {
  ubuntu_arch = var.ami_id == null ? (contains(data.aws_ec2_instance_type.builder[0].supported_architectures, "x86_64") ? "amd64" : "arm64") : null
}

data "aws_ami" "ubuntu" {
  count       = var.ami_id == null ? 1 : 0
  most_recent = true
  owners      = ["099720109477"] # Canonical

  filter {
    name   = "name"
    values = ["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-${local.ubuntu_arch}-server-*"]
  }

  filter {
    name   = "virtualization-type"
    values = ["hvm"]
  }

  filter {
    name   = "root-device-type"
    values = ["ebs"]
  }
}

data "aws_subnet" "selected" {
  count = var.subnet_id == null ? 0 : 1
  id    = var.subnet_id
}

data "aws_vpc" "default" {
  count   = var.subnet_id == null && var.vpc_id == null ? 1 : 0
  default = true
}

# Spot request and replacement triggers, decided without a provider so
# tests/terraform can check them offline.
module "settings" {
  source = "./settings"

  spot     = var.spot
  ssh_user = var.ssh_user
}

locals {
  ami_id = var.ami_id != null ? var.ami_id : data.aws_ami.ubuntu[0].id
  vpc_id = var.subnet_id != null ? data.aws_subnet.selected[0].vpc_id : (var.vpc_id != null ? var.vpc_id : data.aws_vpc.default[0].id)

  ssh_public_key = trimspace(var.ssh_public_key)
  # EC2 key pairs take RSA and ED25519 keys only; other key types are
  # authorised by the startup script alone.
  key_pair_supported = can(regex("^(ssh-ed25519|ssh-rsa) ", local.ssh_public_key))

  ecr_repository_arns = var.ecr_repository_arns != null ? var.ecr_repository_arns : [
    "arn:${data.aws_partition.current.partition}:ecr:${var.region}:${data.aws_caller_identity.current.account_id}:repository/*",
  ]

  tags = merge(var.tags, { ManagedBy = "absconda" })

  setup_script = templatefile("${path.module}/../scripts/builder-setup.sh.tftpl", {
    cloud                 = "aws"
    ssh_user              = var.ssh_user
    workspace             = var.workspace
    idle_shutdown_minutes = var.idle_shutdown_minutes
    build_cache_gb        = var.build_cache_gb
    authorized_key_b64    = base64encode(local.ssh_public_key)
    watchdog              = file("${path.module}/../scripts/absconda-idle-watchdog.sh")
    metadata_guard        = file("${path.module}/../scripts/absconda-metadata-guard.sh")
    # The instance id is not known when the user data is rendered: the idle
    # watchdog checks no identity on EC2.
    identity        = ""
    ssh_allow_users = module.settings.ssh_allow_users
  })

  # cloud-init writes the setup script into its per-boot directory before the
  # final stage, which then runs it at this and every later boot. Compressed:
  # EC2 user data is limited to 16 KB.
  user_data = join("\n", [
    "#cloud-config",
    yamlencode({
      write_files = [{
        path        = "/var/lib/cloud/scripts/per-boot/absconda-setup.sh"
        owner       = "root:root"
        permissions = "0700"
        encoding    = "gz+b64"
        content     = base64gzip(local.setup_script)
      }]
    }),
  ])
}

# --- Network ----------------------------------------------------------------

resource "aws_security_group" "builder" {
  name_prefix = "${var.name}-"
  description = "absconda builder ${var.name}: SSH from the configured ranges only"
  vpc_id      = local.vpc_id
  tags        = merge(local.tags, { Name = var.name })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each = toset(var.allowed_ssh_cidr)

  security_group_id = aws_security_group.builder.id
  description       = "SSH to the absconda builder"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = strcontains(each.value, ":") ? null : each.value
  cidr_ipv6         = strcontains(each.value, ":") ? each.value : null
  tags              = local.tags
}

# A security group made by Terraform starts with no egress at all; the builder
# needs package mirrors, base images and the registries it pushes to.
resource "aws_vpc_security_group_egress_rule" "all_ipv4" {
  security_group_id = aws_security_group.builder.id
  description       = "Package mirrors, base images and registries"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "all_ipv6" {
  security_group_id = aws_security_group.builder.id
  description       = "Package mirrors, base images and registries"
  ip_protocol       = "-1"
  cidr_ipv6         = "::/0"
  tags              = local.tags
}

# --- SSH key ----------------------------------------------------------------

# Also authorises the key for the AMI's default user (`ubuntu`), a way in to
# debug a builder whose setup failed.
resource "aws_key_pair" "builder" {
  count = local.key_pair_supported ? 1 : 0

  key_name_prefix = "${var.name}-"
  public_key      = local.ssh_public_key
  tags            = local.tags
}

# --- IAM: push to ECR, nothing else ------------------------------------------

data "aws_iam_policy_document" "assume_from_ec2" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "builder" {
  name_prefix        = "${var.name}-"
  description        = "absconda builder ${var.name}: push images to ECR"
  assume_role_policy = data.aws_iam_policy_document.assume_from_ec2.json
  tags               = local.tags
}

data "aws_iam_policy_document" "ecr_push" {
  statement {
    sid       = "EcrLogin"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }

  statement {
    sid = "EcrPushPull"
    actions = [
      "ecr:BatchCheckLayerAvailability",
      "ecr:BatchGetImage",
      "ecr:CompleteLayerUpload",
      "ecr:GetDownloadUrlForLayer",
      "ecr:InitiateLayerUpload",
      "ecr:PutImage",
      "ecr:UploadLayerPart",
    ]
    resources = local.ecr_repository_arns
  }
}

resource "aws_iam_role_policy" "ecr_push" {
  name   = "ecr-push"
  role   = aws_iam_role.builder.id
  policy = data.aws_iam_policy_document.ecr_push.json
}

resource "aws_iam_instance_profile" "builder" {
  name_prefix = "${var.name}-"
  role        = aws_iam_role.builder.name
  tags        = local.tags
}

# --- The builder ---------------------------------------------------------------

# Switching spot off plans no change to aws_instance
# (hashicorp/terraform-provider-aws#38141); this makes it a replacement.
resource "terraform_data" "market" {
  input = module.settings.replacement_triggers
}

resource "aws_instance" "builder" {
  ami                    = local.ami_id
  instance_type          = var.instance_type
  subnet_id              = var.subnet_id
  availability_zone      = var.subnet_id == null ? var.zone : null
  vpc_security_group_ids = [aws_security_group.builder.id]
  key_name               = local.key_pair_supported ? aws_key_pair.builder[0].key_name : null
  iam_instance_profile   = aws_iam_instance_profile.builder.name

  # EC2 applies this only to an interface in subnet_id; in the default VPC's
  # default subnets a public address is the subnet's default.
  associate_public_ip_address = var.subnet_id != null ? var.associate_public_ip : null

  # The idle watchdog's poweroff stops the instance; it never terminates it.
  instance_initiated_shutdown_behavior = "stop"

  user_data = local.user_data
  # cloud-init writes the per-boot script once per instance: a changed script
  # needs a new instance to take effect.
  user_data_replace_on_change = true

  # Interrupted: stopped (volume and build cache kept), restarted by EC2
  # when capacity returns. EC2 takes "stop" only with a persistent request,
  # which outlives the instance: before anything replaces or destroys a Spot
  # builder, cancel its request (spot_instance_request_id, see README), or
  # EC2 launches an instance no state knows about
  # (hashicorp/terraform-provider-aws#38142).
  dynamic "instance_market_options" {
    for_each = module.settings.spot_options == null ? [] : [module.settings.spot_options]

    content {
      market_type = "spot"

      spot_options {
        instance_interruption_behavior = instance_market_options.value.instance_interruption_behavior
        spot_instance_type             = instance_market_options.value.spot_instance_type
      }
    }
  }

  # IMDSv2 only, and one hop: containers of a build cannot reach the instance
  # credentials through the metadata service (the setup script also drops
  # their packets to it, ../scripts/absconda-metadata-guard.sh).
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  root_block_device {
    volume_size           = var.disk_size
    volume_type           = var.volume_type
    encrypted             = true
    delete_on_termination = true
  }

  tags        = merge(local.tags, { Name = var.name })
  volume_tags = merge(local.tags, { Name = var.name })

  lifecycle {
    # A newer Ubuntu AMI must not replace a working builder (and its cache);
    # use `terraform apply -replace=aws_instance.builder` to move to it.
    ignore_changes = [ami]

    # Switching between Spot and On-Demand replaces the instance.
    replace_triggered_by = [terraform_data.market]

    precondition {
      condition     = var.build_cache_gb < var.disk_size
      error_message = "build_cache_gb must be smaller than disk_size: the build cache lives on the root volume."
    }

    precondition {
      condition     = var.vpc_id == null || var.subnet_id != null
      error_message = "vpc_id needs subnet_id too: name the subnet of that VPC to launch the builder in."
    }

    precondition {
      condition     = var.vpc_id == null || var.subnet_id == null || try(data.aws_subnet.selected[0].vpc_id == var.vpc_id, true)
      error_message = "subnet_id is not in vpc_id."
    }

    precondition {
      condition     = length(local.user_data) <= 16384
      error_message = "the rendered user data is larger than EC2's 16 KB limit."
    }
  }
}

# Outputs absconda reads with `terraform output -json` after `remote provision`.

output "instance_ip" {
  description = "Address absconda connects to over SSH: the public IPv4 address, or the private one when the instance has none. The public address changes at every start; absconda asks EC2 for the current one."
  value       = aws_instance.builder.public_ip != "" ? aws_instance.builder.public_ip : aws_instance.builder.private_ip
}

output "instance_id" {
  description = "EC2 instance ID, for the EC2 API (status, start, stop, console output)."
  value       = aws_instance.builder.id
}

output "ssh_user" {
  description = "Login user on the builder."
  value       = var.ssh_user
}

output "host_key_fingerprints" {
  description = "Empty: the host keys are made at first boot, after Terraform is done. The startup script prints them to the console between `-----BEGIN ABSCONDA HOST KEY FINGERPRINTS-----` and `-----END ABSCONDA HOST KEY FINGERPRINTS-----`, where absconda reads them with GetConsoleOutput (see README)."
  value       = []
}

output "region" {
  description = "Region of the builder."
  value       = var.region
}

output "availability_zone" {
  description = "Availability zone the builder runs in."
  value       = aws_instance.builder.availability_zone
}

output "workspace" {
  description = "Builder workspace directory."
  value       = var.workspace
}

output "spot_instance_request_id" {
  description = "The persistent Spot request behind a Spot builder (empty otherwise). Cancel it before `terraform destroy` so EC2 does not launch a replacement (see README)."
  value       = var.spot ? aws_instance.builder.spot_instance_request_id : ""
}

output "iam_role_name" {
  description = "IAM role of the builder's instance profile (ECR push)."
  value       = aws_iam_role.builder.name
}

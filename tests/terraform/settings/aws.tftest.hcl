# Checks of infra/aws/settings: how the EC2 module requests a Spot builder
# and what replaces it. Run by tests/terraform/module_settings_test.sh.

variables {
  spot     = false
  ssh_user = "absconda"
}

run "on_demand_has_no_spot_options" {
  command = plan

  assert {
    condition     = output.spot_options == null
    error_message = "spot_options: ${jsonencode(output.spot_options)}"
  }

  assert {
    condition     = output.replacement_triggers.market == "on-demand"
    error_message = "trigger: ${jsonencode(output.replacement_triggers)}"
  }
}

run "spot_is_stopped_not_terminated_when_interrupted" {
  command = plan

  variables {
    spot = true
  }

  assert {
    condition     = output.spot_options.instance_interruption_behavior == "stop"
    error_message = "spot_options: ${jsonencode(output.spot_options)}"
  }

  # EC2 accepts "stop" only with a persistent request.
  assert {
    condition     = output.spot_options.spot_instance_type == "persistent"
    error_message = "spot_options: ${jsonencode(output.spot_options)}"
  }

  # Switching spot off must change the trigger, so the instance is replaced.
  assert {
    condition     = output.replacement_triggers.market == "spot"
    error_message = "trigger: ${jsonencode(output.replacement_triggers)}"
  }
}

run "ssh_allows_the_builder_user_and_ubuntu_only" {
  command = plan

  assert {
    condition     = output.ssh_allow_users == "absconda ubuntu"
    error_message = "AllowUsers: ${output.ssh_allow_users}"
  }
}

run "ssh_user_ubuntu_is_listed_once" {
  command = plan

  variables {
    ssh_user = "ubuntu"
  }

  assert {
    condition     = output.ssh_allow_users == "ubuntu"
    error_message = "AllowUsers: ${output.ssh_allow_users}"
  }
}

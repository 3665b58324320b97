# An absconda builder on Azure: one Ubuntu LTS VM with Docker and BuildKit in
# its own resource group, virtual network and network security group (SSH
# from allowed_ssh_cidr only), with a user-assigned managed identity that may
# push to one container registry and deallocate this VM, and nothing else.
#
# The VM sets itself up at every boot (../scripts/builder-setup.sh.tftpl, run
# by cloud-init as a per-boot script). Its idle watchdog and absconda's
# self-stop deallocate it through ARM (absconda-azure-deallocate.sh):
# powering off from inside would keep it allocated and billed.
#
# The SSH host key is made here (tls_private_key) and handed to cloud-init, so
# its fingerprint is an output that `absconda remote provision` pins: no
# trust-on-first-use. The private host key is in the Terraform state: keep
# the state where only the builder's owners can read it.

locals {
  tags = merge(var.tags, { ManagedBy = "absconda" })

  # Known before the VM exists, so the VM's own scripts can name it.
  vm_id = "/subscriptions/${var.subscription_id}/resourceGroups/${var.resource_group}/providers/Microsoft.Compute/virtualMachines/${var.name}"

  setup_script = templatefile("${path.module}/../scripts/builder-setup.sh.tftpl", {
    cloud                 = "azure"
    ssh_user              = var.ssh_user
    workspace             = var.workspace
    idle_shutdown_minutes = var.idle_shutdown_minutes
    build_cache_gb        = var.build_cache_gb
    authorized_key_b64    = base64encode(trimspace(var.ssh_public_key))
    watchdog              = file("${path.module}/../scripts/absconda-idle-watchdog.sh")
    metadata_guard        = file("${path.module}/../scripts/absconda-metadata-guard.sh")
    # The watchdog's own identity check speaks GCE; on Azure the deallocate
    # helper checks the VM's resource id itself.
    identity        = ""
    ssh_allow_users = var.ssh_user
  })

  watchdog_dropin = <<-EOT
    [Service]
    Environment=POWEROFF_COMMAND=/usr/local/sbin/absconda-azure-deallocate
    Environment=ABSCONDA_AZURE_VM_ID=${local.vm_id}
    Environment=ABSCONDA_AZURE_CLIENT_ID=${azurerm_user_assigned_identity.builder.client_id}
  EOT

  custom_data = join("\n", [
    "#cloud-config",
    yamlencode({
      ssh_deletekeys  = true
      ssh_genkeytypes = []
      ssh_keys = {
        ed25519_private = tls_private_key.host_ed25519.private_key_openssh
        ed25519_public  = tls_private_key.host_ed25519.public_key_openssh
      }
      write_files = [
        {
          path        = "/var/lib/cloud/scripts/per-boot/absconda-setup.sh"
          owner       = "root:root"
          permissions = "0700"
          encoding    = "gz+b64"
          content     = base64gzip(local.setup_script)
        },
        {
          path        = "/usr/local/sbin/absconda-azure-deallocate"
          owner       = "root:root"
          permissions = "0755"
          content     = file("${path.module}/absconda-azure-deallocate.sh")
        },
        {
          path        = "/etc/systemd/system/absconda-idle-watchdog.service.d/azure-deallocate.conf"
          owner       = "root:root"
          permissions = "0644"
          content     = local.watchdog_dropin
        },
      ]
    }),
  ])
}

resource "azurerm_resource_group" "builder" {
  name     = var.resource_group
  location = var.location
  tags     = local.tags
}

# --- Host key -----------------------------------------------------------------

resource "tls_private_key" "host_ed25519" {
  algorithm = "ED25519"
}

# --- Network ------------------------------------------------------------------

resource "azurerm_virtual_network" "builder" {
  name                = "${var.name}-vnet"
  location            = azurerm_resource_group.builder.location
  resource_group_name = azurerm_resource_group.builder.name
  address_space       = [var.address_space]
  tags                = local.tags
}

resource "azurerm_subnet" "builder" {
  name                 = "${var.name}-subnet"
  resource_group_name  = azurerm_resource_group.builder.name
  virtual_network_name = azurerm_virtual_network.builder.name
  address_prefixes     = [cidrsubnet(var.address_space, 8, 0)]
}

resource "azurerm_network_security_group" "builder" {
  name                = "${var.name}-nsg"
  location            = azurerm_resource_group.builder.location
  resource_group_name = azurerm_resource_group.builder.name
  tags                = local.tags

  security_rule {
    name                       = "ssh-from-allowed"
    priority                   = 100
    direction                  = "Inbound"
    access                     = "Allow"
    protocol                   = "Tcp"
    source_port_range          = "*"
    destination_port_range     = "22"
    source_address_prefixes    = var.allowed_ssh_cidr
    destination_address_prefix = "*"
  }

  # Azure's defaults allow traffic from inside the virtual network and the
  # load balancer probe; the builder serves nothing but SSH.
  security_rule {
    name                       = "deny-other-inbound"
    priority                   = 4000
    direction                  = "Inbound"
    access                     = "Deny"
    protocol                   = "*"
    source_port_range          = "*"
    destination_port_range     = "*"
    source_address_prefix      = "*"
    destination_address_prefix = "*"
  }
}

# Standard SKU public IPs are static: the address survives deallocation (a
# small hourly charge, see README) and absconda reads it from the NIC anyway.
resource "azurerm_public_ip" "builder" {
  name                = "${var.name}-ip"
  location            = azurerm_resource_group.builder.location
  resource_group_name = azurerm_resource_group.builder.name
  allocation_method   = "Static"
  sku                 = "Standard"
  tags                = local.tags
}

resource "azurerm_network_interface" "builder" {
  name                = "${var.name}-nic"
  location            = azurerm_resource_group.builder.location
  resource_group_name = azurerm_resource_group.builder.name
  tags                = local.tags

  ip_configuration {
    name                          = "primary"
    subnet_id                     = azurerm_subnet.builder.id
    private_ip_address_allocation = "Dynamic"
    public_ip_address_id          = azurerm_public_ip.builder.id
    primary                       = true
  }
}

resource "azurerm_network_interface_security_group_association" "builder" {
  network_interface_id      = azurerm_network_interface.builder.id
  network_security_group_id = azurerm_network_security_group.builder.id
}

# --- Identity -----------------------------------------------------------------

resource "azurerm_user_assigned_identity" "builder" {
  name                = "${var.name}-identity"
  location            = azurerm_resource_group.builder.location
  resource_group_name = azurerm_resource_group.builder.name
  tags                = local.tags
}

# Only what the self-stop and the idle watchdog need, assigned on this VM
# alone: the identity cannot start, delete or touch any other machine.
resource "azurerm_role_definition" "deallocate" {
  name        = "${var.name}-self-deallocate"
  scope       = azurerm_resource_group.builder.id
  description = "Lets an absconda builder read and deallocate itself."

  permissions {
    actions = [
      "Microsoft.Compute/virtualMachines/read",
      "Microsoft.Compute/virtualMachines/deallocate/action",
    ]
  }

  assignable_scopes = [azurerm_resource_group.builder.id]
}

resource "azurerm_role_assignment" "deallocate" {
  scope              = azurerm_linux_virtual_machine.builder.id
  role_definition_id = azurerm_role_definition.deallocate.role_definition_resource_id
  principal_id       = azurerm_user_assigned_identity.builder.principal_id
  principal_type     = "ServicePrincipal"
}

resource "azurerm_role_assignment" "acr_push" {
  count = var.acr_id == null ? 0 : 1

  scope                = var.acr_id
  role_definition_name = "AcrPush"
  principal_id         = azurerm_user_assigned_identity.builder.principal_id
  principal_type       = "ServicePrincipal"
}

# --- VM -----------------------------------------------------------------------

resource "azurerm_linux_virtual_machine" "builder" {
  name                  = var.name
  location              = azurerm_resource_group.builder.location
  resource_group_name   = azurerm_resource_group.builder.name
  size                  = var.machine_type
  admin_username        = var.ssh_user
  network_interface_ids = [azurerm_network_interface.builder.id]
  custom_data           = base64encode(local.custom_data)
  tags                  = local.tags

  disable_password_authentication = true

  admin_ssh_key {
    username   = var.ssh_user
    public_key = trimspace(var.ssh_public_key)
  }

  os_disk {
    caching              = "ReadWrite"
    storage_account_type = "Premium_LRS"
    disk_size_gb         = var.disk_size
  }

  source_image_reference {
    publisher = "Canonical"
    offer     = "ubuntu-24_04-lts"
    sku       = "server"
    version   = "latest"
  }

  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.builder.id]
  }

  # Spot: an eviction deallocates (never deletes) the VM; -1 pays up to the
  # on-demand price, so only capacity evicts it.
  priority        = var.spot ? "Spot" : "Regular"
  eviction_policy = var.spot ? "Deallocate" : null
  max_bid_price   = var.spot ? -1 : null

  # Managed boot diagnostics: the serial log absconda can read host key
  # fingerprints from for VMs made elsewhere.
  boot_diagnostics {}

  lifecycle {
    # A new image version must not replace the VM and lose its build cache.
    ignore_changes = [source_image_reference]
  }
}

"""mailwarden control plane: the MailAccount operator and its webhook."""

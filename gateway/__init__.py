"""The service and the `redact` command."""

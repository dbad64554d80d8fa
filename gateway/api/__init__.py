"""HTTP routes, one module per resource: media jobs, account, health and metrics."""

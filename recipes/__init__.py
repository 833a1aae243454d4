"""Training recipes shipped with unsupdistill: YAML files holding their differences from the defaults."""

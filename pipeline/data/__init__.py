"""Data in: the tenant's sources, the extract stage, the partitioned history, the API event log, attributes."""

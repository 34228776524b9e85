"""Several nodes over one PostgreSQL database: leases, placement, forwarding, the change feed."""

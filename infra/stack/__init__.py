"""The local stack ``headbench up`` runs: its services and their processes, the Ray nodes it starts, its
PostgreSQL and SeaweedFS configuration, and the Prefect API client with the stack's login."""

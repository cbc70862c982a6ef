"""kvrelay's deployment: one source of service configuration (services.toml) and what is
rendered from it (docker compose, Prometheus, Nomad), plus the multi-host test harness."""

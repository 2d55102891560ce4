"""Sample data: the MovieLens-100K demo tenant and synthetic tenants for tests and benchmarks."""

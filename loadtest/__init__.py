"""Load tests and benchmarks of the MISSRec service: locust traffic, service vs bare endpoint, scale and scale-out."""

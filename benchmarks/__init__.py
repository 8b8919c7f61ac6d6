"""`make bench`: throughput, overhead, memory and GPU-readiness benchmarks writing results/*.json."""

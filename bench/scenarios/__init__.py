"""One module per workload; each `run(bench)` returns its figures, paths interleaved."""

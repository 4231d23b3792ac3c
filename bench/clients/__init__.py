"""Client workloads. They run in the worker process (`bench.worker`), away from the IdP
and aiosmtpd threads of the main process, so the client doesn't compete for their GIL."""

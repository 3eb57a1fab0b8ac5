"""Ground floor: errors and exit codes, shared names, the version, outputs written whole, containers, threads, waits."""

"""Ground floor: errors and exit codes, shared names, the version, outputs written whole, safetensors containers, threads."""

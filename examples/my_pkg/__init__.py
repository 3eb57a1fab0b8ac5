"""A user's own package, as ``actsparse`` takes it: ``my_pkg.models:build``."""

"""Data: the batch union, data that streams, readers of users' files, the I/O spec, the output comparator, a model with its data."""

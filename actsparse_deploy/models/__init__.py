"""Models: Hugging Face directories, the built-ins and their data, users' models loaded safely."""

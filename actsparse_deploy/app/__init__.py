"""The application: one function per command, the stage runner, budget and sweep on top of it, the report, the command line."""

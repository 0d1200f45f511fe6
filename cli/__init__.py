"""The `fedrec` command line: every command and its options (built from the run config's fields)."""

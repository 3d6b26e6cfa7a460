"""Per-node GPU metrics and fault agent (`digital-worker agent`); installs with the `agent` extra alone."""

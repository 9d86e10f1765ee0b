"""Command-line tools (installed as console scripts; also runnable from tools/)."""

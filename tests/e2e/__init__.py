"""End-to-end tests: the CLI and the launchers train real (tiny) grids into temporary results folders."""

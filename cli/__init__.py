"""The `reenact` command-line client (cli.main) and its HTTP client (cli.api)."""

"""Built-in method plugins, one module per method; registered through the `harness.methods`
entry-point group in pyproject.toml (a third-party package registers its own the same way)."""

"""Built-in components. Each module is a plugin registered exactly as a third-party package would be."""

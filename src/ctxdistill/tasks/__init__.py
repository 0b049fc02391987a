"""Built-in task loaders: Super-NaturalInstructions (and, later, SPIDER and addition)."""

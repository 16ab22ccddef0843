"""SQL storage: models, engine and repository functions (callers own transactions)."""

"""Alembic migrations: the only way medreid's schema changes."""

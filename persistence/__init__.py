"""Baton's store: SQLModel tables and the transactional operations the runtime needs."""

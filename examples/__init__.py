"""Runnable examples (``baton demo`` runs ``examples.coding_agent``)."""

"""Celery wiring: Baton's internal tasks, activity hooks, dispatch and the recovery sweeper."""

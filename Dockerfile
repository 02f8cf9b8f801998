# The image docker-compose.yml runs for its workers, Flower and the dashboard: Baton, its
# dependencies and the example agent (examples/coding_agent.py).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --create-home --uid 1000 baton \
    && mkdir -p /workspaces \
    && chown baton /workspaces

# Dependencies first, so that code edits do not reinstall them.
COPY pyproject.toml README.md ./
COPY sdk ./sdk
COPY tasks ./tasks
COPY persistence ./persistence
COPY dashboards ./dashboards
RUN pip install -e .

COPY examples ./examples

USER baton
# `celery -A examples.coding_agent` and `baton -A examples.coding_agent` import from here.
ENV PYTHONPATH=/app
CMD ["baton", "--help"]

# One image for every process of the platform (api, worker, beat, flower, migrate).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/notifier

COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models
COPY tasks ./tasks
COPY migrations ./migrations
COPY alembic.ini celeryconfig.py wsgi.py gunicorn.conf.py Procfile ./
RUN pip install --no-cache-dir . && useradd --system --home /srv/notifier notifier \
    && mkdir -p var && chown notifier var
USER notifier

EXPOSE 8000 5555
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]

"""Entry point for gunicorn (`wsgi:app`) and Celery (`-A wsgi.celery_app`)."""

from app import create_app

app = create_app()
celery_app = app.extensions["celery"]

"""Gunicorn settings shared by the run command and the image: ``gunicorn -c python:marketplace.gunicorn_conf``."""

from marketplace.metrics import multiprocess_dir_reset


def on_starting(server):
    # With PROMETHEUS_MULTIPROC_DIR set, every worker writes its counters there; a restart must not
    # add the previous run's counts to the new ones.
    multiprocess_dir_reset()

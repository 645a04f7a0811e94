"""python -m mergeflow.cli"""

from mergeflow.cli import app

app()

"""python -m mergeflow.cli"""

from mergeflow.cli import run

run()

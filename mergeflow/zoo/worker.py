"""A zoo build worker, started by `mergeflow.zoo.parallel` as `python -m mergeflow.zoo.worker`.

Reads a pickled Preset from stdin, then one pickled (Step, threads) at a time; answers each on
stdout with a pickled (outcome, None), or (None, message) when the step failed. A process of its own rather
than a multiprocessing child: spawned children import the parent's `__main__`, which reruns an
unguarded script's build in every worker.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback


def main() -> None:
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the answers
    # Ctrl-C reaches the whole process group; the parent stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from mergeflow.errors import MergeflowError
    from mergeflow.zoo.build import Builder
    from mergeflow.zoo.parallel import run_step

    requests = sys.stdin.buffer
    builder = Builder(pickle.load(requests), progress=False)
    while True:
        try:
            step, threads = pickle.load(requests)
        except EOFError:
            return
        torch.set_num_threads(threads)
        try:
            answer = (run_step(builder, step), None)
        except Exception as error:  # reported to the parent, which stops the build
            if not isinstance(error, MergeflowError):
                traceback.print_exc()
            answer = (None, f"{type(error).__name__}: {error}")
        pickle.dump(answer, answers)
        answers.flush()


if __name__ == "__main__":
    main()

"""Entry point: `python -m flix.eval --gin_file=configs/demo_eval.gin ...`.

Runs the gin-configured `flix.evaluation.evaluate_checkpoint`: per
(feature set, metric) results JSON, a readable table, and a task x language
heatmap.
"""

from flix import evaluation
from flix import gin_utils


def main(argv):
  gin_utils.setup(argv)
  gin_utils.call_configured(evaluation.evaluate_checkpoint)


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main)

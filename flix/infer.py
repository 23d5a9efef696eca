"""Entry point: `python -m flix.infer --gin_file=configs/demo_infer.gin ...`.

Runs the gin-configured `flix.inference.write_predictions`: JSONL predictions for a
featurized JSONL file or a SeqIO task split.
"""

from flix import gin_utils
from flix import inference


def main(argv):
  gin_utils.setup(argv)
  gin_utils.call_configured(inference.write_predictions)


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main)

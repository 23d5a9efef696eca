"""Entry point: `python -m flix.train --gin_file=configs/demo.gin ...`.

Runs the gin-configured `flix.trainer.train`, as T5X's train.py runs its
train(); writes the operative config to MODEL_DIR/config.gin first.
"""

from flix import gin_utils
from flix import trainer


def main(argv):
  gin_utils.setup(argv)
  gin_utils.write_operative_config(gin_utils.macro_value("MODEL_DIR"))
  gin_utils.call_configured(trainer.train)


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main)

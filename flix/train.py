"""Entry point: `python -m flix.train --gin_file=configs/demo.gin ...`.

Runs the gin-configured `flix.trainer.train`, as T5X's train.py runs its
train(); the trainer writes the config to MODEL_DIR/config.gin once the run
holds MODEL_DIR and matches its checkpoints.
"""

import gin

from flix import gin_utils
from flix import trainer


def main(argv):
  gin_utils.setup(argv)
  gin_utils.call_configured(trainer.train, operative_config=gin.config_str())


if __name__ == "__main__":
  gin_utils.define_flags()
  gin_utils.run(main)

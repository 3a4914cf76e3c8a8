"""Train a model: `python train.py --config configs/crm_synthetic.py --workdir DIR`.

Any config field can be overridden: `--config.batch_size=16 --config.model.depth=50`; an
unknown field is named with the closest valid one (exit status 2). Progress and metrics are
logged (absl INFO) and written to DIR/tensorboard; see `jax_refine.train.loop`. A run that
fails (a configuration error in the first step, a non-finite loss) exits with status 1.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jax_refine.train import cli_flags
from jax_refine.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and summaries.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli_flags.quiet_library_logs(logging)
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.parse_flags)

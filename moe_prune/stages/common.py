"""What the CLI needs from below `stages` before any stage runs: option parsers, output checks, demo paths.

Re-exported here so the CLI imports only `moe_prune.stages` (the import contract in pyproject.toml);
everything here is light, so `--help` stays instant.
"""

from moe_prune.demo import DEMO_ALIAS as DEMO_ALIAS
from moe_prune.demo import DEMO_CALIBRATION as DEMO_CALIBRATION
from moe_prune.demo import DEMO_HELDOUT as DEMO_HELDOUT
from moe_prune.demo import DEMO_MODEL_DIR as DEMO_MODEL_DIR
from moe_prune.io.output import check_not_input as check_not_input
from moe_prune.io.output import check_writable as check_writable
from moe_prune.plotting import check_plot as check_plot
from moe_prune.plotting import pyplot as pyplot
from moe_prune.plotting import save_figure as save_figure
from moe_prune.sizes import parse_size as parse_size
from moe_prune.sizes import parse_tokens as parse_tokens

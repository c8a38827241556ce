"""Options and parameter types several commands share, declared once; and the one rule by which
flags override a config file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from micromerge.merging.methods import METHODS

METHOD_HELP = f"One of `micromerge methods` ({', '.join(METHODS)})."
"""The --method help, read from the registry so a new method shows up without an edit here."""


def _method_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """--method's shell completion, from the registry. Not a click.Choice: an unknown name gets the
    registry's own one-line error with its nearest names (merging.methods.get_method)."""
    return [name for name in METHODS if name.startswith(incomplete)]


METHOD = click.option(
    "--method", default="wise-ft", show_default=True, help=METHOD_HELP, shell_complete=_method_names
)


class OneAlpha(click.ParamType):
    """--alpha's number; a list or range typed there ("0.5,0.7") was "not a valid float", without
    a word of the --alphas beside it that takes exactly that."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            several = isinstance(value, str) and ("," in value or ":" in value)
            self.fail(
                f"{value!r} is not one number"
                + ("; several alphas go to --alphas (a,b,c or START:STOP:STEP)" if several else ""),
                param,
                ctx,
            )


Command = TypeVar("Command", bound=Callable[..., Any])
"""A command function, as the decorators that add options hand it back."""

ARCH = click.option(
    "--arch", help="Architecture name when a checkpoint does not say (e.g. ViT-B-32-quickgelu)."
)
ALLOW_PICKLE = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Read pickles that hold Python objects (restricted unpickler, no code run).",
)
CACHE_DIR = click.option(
    "--cache-dir",
    type=click.Path(),
    help="Image and statistics cache (default: ~/.cache/micromerge); one folder for every process of a launch.",
)
DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")
SEED = click.option("--seed", type=int, default=0, show_default=True, help="Seed of everything random.")
INCLUDE = click.option(
    "--include", multiple=True, help="Only keys matching this glob (or re:REGEX); the others from the base."
)
EXCLUDE = click.option("--exclude", multiple=True, help="Never keys matching this glob (or re:REGEX).")
"""Options several commands take, declared once."""

BASE_HELP = "The base (pre-trained) checkpoint: zoo name, hf-hub: id, file or folder."
FINETUNED_HELP = "A fine-tuned checkpoint (repeat for task arithmetic, TIES, DARE ...)."
WEIGHTS_HELP = "linear: comma-separated weights, base first (default uniform; not normalised)."
"""Help of the merge inputs `merge` and `sweep` both take (merge's are optional: a config file may
give them), so the two commands describe them in the same words."""


def method_options(func: Command) -> Command:
    """The method parameters `merge` and `sweep` share (merging.methods.TUNABLE, one option each);
    None means the method's default (MethodParams)."""
    options = [
        click.option(
            "--density",
            type=float,
            help="TIES/Breadcrumbs/DELLA: fraction of task-vector entries kept [0.2].",
        ),
        click.option("--drop-rate", type=float, help="DARE: probability of dropping an entry [0.9]."),
        click.option(
            "--topk-scope",
            type=click.Choice(["model", "tensor"]),
            help="TIES/Breadcrumbs: rank magnitudes over the whole task vector (model: the TIES paper, "
            "FusionBench) or per tensor (tensor: mergekit) [model].",
        ),
        click.option(
            "--slerp-scope",
            type=click.Choice(["tensor", "row"]),
            help="SLERP: one angle per tensor (mergekit <= 0.1.4) or per output row (mergekit 0.1.5) [tensor].",
        ),
        click.option(
            "--gamma", type=float, help="Breadcrumbs: fraction of largest magnitudes dropped [0.01]."
        ),
        click.option(
            "--epsilon", type=float, help="DELLA: keep probabilities span density +/- epsilon by rank [0.15]."
        ),
        click.option(
            "--rescale",
            type=click.Choice(["inverse", "l1"]),
            help="DARE/DELLA: divide each kept entry by its keep probability (inverse: the papers, "
            "FusionBench) or restore each tensor's L1 norm (l1: mergekit) [inverse; l1 for DELLA].",
        ),
        click.option("--beta", type=float, help="LiNeS: last block's scale minus the first block's [0.5]."),
        click.option(
            "--samples",
            type=int,
            help="Fisher/RegMean/AdaMerging/supervised-alpha: select-half questions (or corpus pairs) to learn "
            "from, at most; fewer where there are fewer [256].",
        ),
        click.option(
            "--offdiag-scale", type=float, help="RegMean: Gram off-diagonals scaled by this [0.95]."
        ),
        click.option(
            "--granularity",
            type=click.Choice(["task", "block", "layer"]),
            help="AdaMerging/supervised-alpha: one coefficient per specialist, per residual block or per "
            "parameter tensor [layer; block for supervised-alpha].",
        ),
        click.option(
            "--search",
            type=click.Choice(["gradient", "grid"]),
            help="supervised-alpha: Adam on the zero-shot cross-entropy, or a coordinate grid search [gradient].",
        ),
        click.option("--steps", type=int, help="AdaMerging/supervised-alpha: Adam steps [200]."),
        click.option(
            "--learning-rate", type=float, help="AdaMerging/supervised-alpha: Adam's learning rate [1e-3]."
        ),
        click.option("--init", type=float, help="AdaMerging/supervised-alpha: starting coefficient [0.3]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def statistics_data_options(func: Command) -> Command:
    """Fisher/RegMean: a corpus per model to estimate its statistics on, instead of μ-Bench's select half."""
    func = click.option(
        "--ft-data",
        multiple=True,
        help="Fisher/RegMean: each specialist's own corpus (its fine-tuning data; repeat, one per --ft, in order).",
    )(func)
    return click.option(
        "--base-data",
        help="Fisher/RegMean: the base's own corpus (general data: any image-caption format `finetune` "
        "reads, '#options' included).",
    )(func)


def explicit_options(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """Only the options the user typed (so a config file supplies the rest)."""
    return {
        name: value
        for name, value in values.items()
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }


UBENCH_DATA_HELP = (
    "'ubench[@REVISION]' (the Hub; its cached snapshot offline) or a local μ-Bench copy: the Hub's "
    "perception/0.1.0 folder or its parent, a save_to_disk folder, parquet/arrow files or their folder."
)
"""Where --data points, as `tasks`, `eval`, `sweep` and `soup` read it."""
SOURCES_HELP = "TOML overriding the source metadata table (scale, taxonomy, ...)."

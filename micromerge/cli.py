"""The `micromerge` command line: wires the stages together; no logic of its own.

Every MicromergeError becomes one line on stderr and exit code 2; warnings print as one
`warning:` line. Flags and config files become plain dataclasses here and flow down.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import click
from click.core import ParameterSource

from micromerge import __version__
from micromerge.core.errors import MicromergeError
from micromerge.eval.setting_values import PRECISIONS, PROMPTS, PROTOCOLS
from micromerge.merging.methods import METHODS

if TYPE_CHECKING:  # the commands import what they run lazily: `micromerge --help` stays fast
    from accelerate import PartialState

    from micromerge.eval.engine import EvalSettings
    from micromerge.merging.execute import StatisticsInput
    from micromerge.merging.job import MergeJob
    from micromerge.merging.sources import CheckpointAccess

METHOD_HELP = f"One of `micromerge methods` ({', '.join(METHODS)})."
"""The --method help, read from the registry so a new method shows up without an edit here."""


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


def _warning_printer() -> Callable[..., None]:
    """`warnings.showwarning` for one command: each message once, as one line. Python's own
    once-per-place rule does not hold for a whole command: every change of the warning filters
    (a `catch_warnings` block, in our code or a library's) clears what it remembers, and a soup
    said the same line once for every candidate it evaluated."""
    shown: set[str] = set()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = str(message)
        if text not in shown:
            shown.add(text)
            click.echo(f"warning: {text}", err=True)

    return show


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-fixable errors into a one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Scoped to the command: a caller that imports the CLI (tests, notebooks, click's
        # CliRunner) gets its own warning display back afterwards.
        try:
            _refuse_blank_parameters(click.get_current_context())
            with warnings.catch_warnings():
                warnings.showwarning = _warning_printer()
                return func(*args, **kwargs)
        except MicromergeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(f"interrupted: {_how_to_go_on(click.get_current_context())}", err=True)
            sys.exit(130)
        finally:
            _leave_process_group()

    return wrapper


def _how_to_go_on(ctx: click.Context) -> str:
    """What an interrupted command kept and how to continue it. A fine-tune keeps its last
    checkpoint and continues only with --resume (run again as it was, it refuses the folder it
    left), so saying "run the same command again" cost a fine-tuner a second try."""
    if "resume" not in ctx.params:
        return "finished work is kept; run the same command again to resume"
    again = "again" if ctx.params["resume"] else "with --resume"
    return f"the last checkpoint (saved every --save-every steps) is kept; run the same command {again} to continue from it"


def _leave_process_group() -> None:
    """End the process group `accelerate launch` started (torch.distributed's documented exit). Left
    to the interpreter's shutdown, gloo's worker threads may still hold tensors whose release then
    needs the GIL of an interpreter being torn down, and the process dies of SIGABRT
    (pytorch/pytorch#179291), as a rank of the two-process fine-tune test once did at its end in
    CI. Nothing to do in a plain run, and torch is not imported for it."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def _refuse_blank_parameters(ctx: click.Context) -> None:
    """An empty option or argument as typed (`--out "$OUT"` with the variable unset) in one line:
    read as 'not given' it silently ran a default (`report --target ""`), read as a path it was the
    working folder (`report --out ""` wrote report.html there). An empty environment variable
    (HF_TOKEN=) keeps its usual meaning, unset: click does not read it."""
    from micromerge.core.config_schema import is_blank

    for param in ctx.command.params:
        name = param.name or ""
        value = ctx.params.get(name)
        value = list(value) if isinstance(value, tuple) else value
        if not is_blank(value):
            continue
        shown = param.human_readable_name if isinstance(param, click.Argument) else max(param.opts, key=len)
        what = "empty" if isinstance(value, str) else "an empty entry"
        fix = "give a value" if param.required else f"give a value, or drop {shown} for its default"
        raise MicromergeError(f"{shown} {value!r}: {what} (an unset variable?); {fix}")


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="micromerge")
def cli() -> None:
    """Fine-tune, merge and evaluate CLIP-style models on microscopy (the μ-Bench loop)."""


MERGE_HELP = """Merge checkpoints: `merge --base A --ft B --alpha 0.5` (WiSE-FT by default).

Checkpoints are zoo names (`micromerge zoo`), hf-hub: ids, .safetensors/.pt/.bin files, or
transformers/open_clip folders. Output: a safetensors file plus <file>.manifest.json.
"""


@click.command("merge", help=MERGE_HELP)
@click.option("--base", help="The base (pre-trained) checkpoint.")
@click.option(
    "--ft",
    "finetuned",
    multiple=True,
    help="A fine-tuned checkpoint (repeat for task arithmetic, TIES, DARE).",
)
@click.option(
    "--method",
    type=str,
    default="wise-ft",
    show_default=True,
    help=METHOD_HELP,
)
@click.option(
    "--alpha",
    type=OneAlpha(),
    help="WiSE-FT alpha, task-arithmetic/TIES/DARE/Breadcrumbs/DELLA/TSV/Iso-C lambda, SLERP t, LiNeS's "
    "first-block scale, Model Stock's step (default 0.5; 1.0 for model-stock, tsv, iso-c).",
)
@click.option(
    "--alphas", help="Several alphas, START:STOP:STEP or a,b,c: one checkpoint each (then --out is a folder)."
)
@click.option(
    "--weights", help="linear: comma-separated weights, base first (default uniform; not normalised)."
)
@method_options
@statistics_data_options
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for stochastic methods (DARE, DELLA) and, with --data, of the select half data-aware "
    "methods learn from (evaluate the merge with the same --seed).",
)
@INCLUDE
@EXCLUDE
@click.option(
    "--alpha-rule", "alpha_rules", multiple=True, help="PATTERN=VALUE: a per-key alpha, first match wins."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Output dtype of every float tensor (default: a merged tensor takes its inputs' dtype, the widest "
    "where they differ, fp16 + fp32 -> fp32; a copied one keeps the base's).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu or cuda[:N]. auto: the CPU when the numpy engine can run the merge "
    "(a one-off merge is I/O-bound; see --engine), else CUDA when present.",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "numpy", "torch"]),
    default="auto",
    show_default=True,
    help="auto: numpy (no torch import) when the method is elementwise, the device the CPU and "
    "every input a local safetensors file without bfloat16; torch otherwise. Same bytes either way.",
)
@click.option("--out", type=click.Path(dir_okay=True), help="Output .safetensors (or folder with --alphas).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@ALLOW_PICKLE
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs with NaN/Inf (warn instead of refusing).")
@ARCH
@click.option(
    "--data",
    help="Fisher/RegMean: the μ-Bench copy ('ubench' or a folder) whose select half the statistics come from.",
)
@CACHE_DIR
@click.option(
    "--config",
    "config_file",
    type=click.Path(),
    help="TOML/YAML file with a [merge] table; flags override it.",
)
@QUIET
@click.pass_context
@friendly_errors
def merge_command(ctx: click.Context, config_file: str | None, quiet: bool, **values: Any) -> None:
    from micromerge.core.config_files import load_section
    from micromerge.core.config_schema import MERGE_SCHEMA
    from micromerge.merging.job import job_from_mapping, run_merge_job, warn_of_a_variant_with_one_finetuned

    mapping: dict[str, Any] = {}
    if config_file:
        mapping.update(load_section(config_file, "merge", MERGE_SCHEMA))
    defaults = {k: v for k, v in values.items() if k not in mapping}
    mapping.update({k: v for k, v in defaults.items() if v not in ((), None)})
    mapping.update(explicit_options(ctx, values))
    mapping = {k: (list(v) if isinstance(v, tuple) else v) for k, v in mapping.items()}
    job = job_from_mapping(mapping)
    warn_of_a_variant_with_one_finetuned(job)
    outputs = run_merge_job(job, progress=not quiet, statistics=_merge_statistics(job, quiet))
    for output in outputs:
        if output.reused:
            click.echo(f"kept {output.path} (finished earlier from the same inputs and parameters)")
        else:
            click.echo(
                f"wrote {output.path} ({output.manifest['seconds']:.2f} s; manifest {output.manifest_path.name})"
            )


def _merge_statistics(job: MergeJob, quiet: bool) -> StatisticsInput | None:
    """The statistics a data-aware method merges with, estimated on --data's select half."""
    from micromerge.merging.methods import get_method

    kind = get_method(job.spec.method).statistics
    if kind is None:
        return None
    own_data = len(job.model_data) == 1 + len(job.finetuned) and all(job.model_data)
    if not job.data and not own_data:
        raise MicromergeError(
            f"--method {job.spec.method} learns from data: give --data (a μ-Bench folder, or 'ubench')"
        )
    from micromerge.core.devices import resolve_device
    from micromerge.core.hashing import default_cache_dir
    from micromerge.eval.engine import EvalSettings
    from micromerge.eval.statistics import statistics_input

    settings = EvalSettings(
        data=job.data or "",  # every model has data of its own: μ-Bench is not read
        store=Path(os.devnull),  # statistics write no result rows (prepare(writes_results=False))
        cache_dir=Path(job.cache_dir) if job.cache_dir else default_cache_dir(),
        seed=job.spec.params.seed,  # the select half, as eval and sweep draw it with the same --seed
        progress=not quiet,
    )
    models = (job.base, *job.finetuned)
    device = resolve_device(job.device)
    return statistics_input(kind, models, job.spec.params, settings, device, job.access, job.model_data)


cli.add_command(merge_command)


@cli.command("methods")
@friendly_errors
def methods_command() -> None:
    """List the merge methods: how many --ft each takes, the parameters it reads, the engines it runs on."""
    from micromerge.merging.methods import METHODS

    width = max(len(name) for name in METHODS)
    click.echo(f"{'method':<{width}}  {'--ft':<5} {'engines':<12} parameters / what it does")
    for method in METHODS.values():
        count = f"{method.min_finetuned}+" if method.max_finetuned is None else str(method.max_finetuned)
        engines = "numpy, torch" if method.elementwise else "torch"
        uses = ", ".join("alpha" if name == "strength" else name for name in method.uses)
        click.echo(f"{method.name:<{width}}  {count:<5} {engines:<12} {uses}")
        click.echo(f"{'':<{width}}  {'':<5} {'':<12} {method.summary}")


@cli.command("zoo")
@friendly_errors
def zoo_command() -> None:
    """List the checkpoint zoo: names, architectures, sources and formats."""
    from micromerge.merging.zoo import load_zoo

    rows = [("name", "arch", "domain", "source")] + [
        (e.name, e.arch or (e.arch_config and f"config:{e.arch_config}") or "?", e.domain or "", e.source)
        for e in load_zoo().values()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]  # the source goes last, unpadded
    for *padded, source in rows:
        click.echo("".join(f"{cell:<{width}}  " for cell, width in zip(padded, widths, strict=True)) + source)


@cli.command("export")
@click.argument("checkpoint")
@click.option("--out", required=True, type=click.Path(), help="Folder to write.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["transformers", "open_clip"]),
    default="transformers",
    show_default=True,
    help="transformers: CLIPModel + CLIPProcessor files; open_clip: what `local-dir:`/`hf-hub:` load.",
)
@ARCH
@ALLOW_PICKLE
@click.option(
    "--results", type=click.Path(), help="A results store: put this checkpoint's `eval` in its model card."
)
@click.option("--force", is_flag=True, help="Overwrite an existing folder's files.")
@friendly_errors
def export_command(
    checkpoint: str,
    out: str,
    fmt: str,
    arch: str | None,
    allow_pickle: bool,
    results: str | None,
    force: bool,
) -> None:
    """Export a checkpoint as a folder other tools open (e.g. a merged PLIP), with its model card."""
    from micromerge.merging.export import export_checkpoint
    from micromerge.merging.sources import CheckpointAccess

    access = CheckpointAccess(allow_pickle, arch)
    evaluation = _evaluation_of(checkpoint, results, access) if results else None
    path = export_checkpoint(checkpoint, out, fmt, access, force=force, evaluation=evaluation)
    click.echo(f"wrote {path} ({fmt}, with README.md)")


def _evaluation_of(checkpoint: str, store: str, access: CheckpointAccess) -> list[dict[str, Any]]:
    """The checkpoint's own `eval` rows in the store (matched by sha256): each task's accuracy on
    all its images (pooled over its caption keys) and the paper's two headline numbers; per
    protocol, the store's latest run of it (an earlier run, on other data or settings, would put a
    second, different number beside each task)."""
    from micromerge.eval.engine import HEADLINE_COARSE, HEADLINE_FINE, POOLED
    from micromerge.eval.store import ResultStore
    from micromerge.merging.execute import input_hashes

    results = ResultStore(Path(store))
    results.check_readable("--results")
    with access.open(checkpoint) as source:
        digests = sorted(input_hashes([source]).values())
    rows = [
        r
        for r in results.rows()
        if r.get("method") == "none"
        and sorted(r["model"].get("base_sha256") or []) == digests
        and r["metric"] == "accuracy"
        and r["split"] == "all"
        and (r["task"] in (HEADLINE_COARSE, HEADLINE_FINE) or r.get("caption_key") in (POOLED, None))
    ]
    if not rows:
        raise MicromergeError(
            f"--results {store}: no `micromerge eval` of {checkpoint} in it (matched by sha256)"
        )
    latest = {r.get("protocol"): r["run_id"] for r in rows}
    older = sorted({r["run_id"] for r in rows} - set(latest.values()))
    if older:
        warnings.warn(
            f"--results {store}: {len(older)} earlier eval run(s) of {checkpoint} left out of the card "
            f"(the latest per protocol is used): {', '.join(older)}",
            stacklevel=2,
        )
    return [r for r in rows if latest[r.get("protocol")] == r["run_id"]]


@cli.command("push")
@click.argument("folder", type=click.Path())
@click.option("--repo", required=True, help="The Hugging Face repo id to create or update (org/name).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--token", envvar="HF_TOKEN", help="A Hugging Face token with write access [env HF_TOKEN].")
@friendly_errors
def push_command(folder: str, repo: str, private: bool, token: str | None) -> None:
    """Upload an exported folder (weights, configs, model card) to the Hugging Face Hub."""
    from micromerge.merging.push import push_folder

    click.echo(f"pushed {folder} to {repo}: {push_folder(folder, repo, private, token)}")


def _run(command: click.Command, prog_name: str) -> None:
    """Run a click command with usage errors as one line (`error: ...`, exit 2), like every other
    bad input, instead of click's three (usage, hint, error). Off a terminal, the libraries' own
    progress bars (datasets, huggingface_hub) stay quiet, as ours print a few lines."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help, as click prints it
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else prog_name
        click.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def main() -> None:
    _run(cli, "micromerge")


def merge_main() -> None:
    _run(merge_command, "merge")


UBENCH_DATA_HELP = (
    "'ubench[@REVISION]' (the Hub; its cached snapshot offline) or a local μ-Bench copy: the Hub's "
    "perception/0.1.0 folder or its parent, a save_to_disk folder, parquet/arrow files or their folder."
)


def _eval_options(func: Command) -> Command:
    """Options shared by `eval` and `sweep`."""
    options = [
        click.option("--data", default="ubench", show_default=True, help=UBENCH_DATA_HELP),
        click.option(
            "--tasks",
            default="all",
            show_default=True,
            help="Comma-separated: all, coarse, fine, task names, name patterns (held_*) or groups as "
            "`micromerge tasks` lists them (domain:pathology, scale:tissue, paper:yes).",
        ),
        click.option(
            "--store",
            type=click.Path(),
            default="results/results.jsonl",
            show_default=True,
            help="Results store (JSONL).",
        ),
        click.option("--batch-size", type=int, default=256, show_default=True),
        click.option(
            "--precision",
            type=click.Choice(PRECISIONS),
            default="bf16",
            show_default=True,
            help="Autocast on GPU (CPU always fp32).",
        ),
        click.option(
            "--bootstrap",
            type=int,
            default=1000,
            show_default=True,
            help="Bootstrap resamples for 95% intervals (0: none).",
        ),
        SEED,
        click.option(
            "--protocol",
            type=click.Choice(PROTOCOLS),
            default="ubench",
            show_default=True,
            help="ubench: each image scored against its own caption options, as the μ-Bench authors do; "
            "closed-set: against every class of the task (CLIP_benchmark-style).",
        ),
        click.option(
            "--prompts",
            type=click.Choice(PROMPTS),
            default="names",
            show_default=True,
            help="closed-set: class names in templates, or class captions.",
        ),
        click.option(
            "--sources",
            type=click.Path(),
            help="TOML overriding the source metadata table (scale, taxonomy, ...).",
        ),
        DEVICE,
        CACHE_DIR,
        ALLOW_PICKLE,
        ARCH,
        QUIET,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _eval_settings(values: dict[str, Any]) -> tuple[EvalSettings, PartialState]:
    from pathlib import Path

    from accelerate import PartialState

    from micromerge.core.hashing import default_cache_dir
    from micromerge.eval.engine import EvalSettings

    state = PartialState(cpu=values["device"] == "cpu")
    settings = EvalSettings(
        data=values["data"],
        store=Path(values["store"]),
        cache_dir=Path(values["cache_dir"]) if values.get("cache_dir") else default_cache_dir(),
        tasks=values["tasks"],
        batch_size=values["batch_size"],
        precision=values["precision"],
        bootstrap=values["bootstrap"],
        seed=values["seed"],
        prompts=values["prompts"],
        protocol=values["protocol"],
        sources=Path(values["sources"]) if values.get("sources") else None,
        progress=not values["quiet"] and state.is_main_process,
        rank=state.process_index,
        world_size=state.num_processes,
    )
    return settings, state


def _print_table(rows: list[dict[str, Any]]) -> None:
    from micromerge.core.provenance import has_interval, trained_on_note
    from micromerge.eval.aggregate import aggregate

    by_alpha: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        by_alpha.setdefault(row["alpha"], []).append(row)
    for alpha, alpha_rows in sorted(by_alpha.items(), key=lambda item: -1 if item[0] is None else item[0]):
        if alpha is not None:
            click.echo(f"\nalpha = {alpha:g}")
        click.echo(
            f"{'task':<34} {'caption key':<18} {'level':<8} {'n':>6} {'accuracy':>9} {'95% CI':>15} {'bal.acc':>8}"
        )
        table: dict[tuple[str, Any], dict[str, Any]] = {}
        for row in alpha_rows:
            if row.get("split", "all") == "all":
                table.setdefault((row["task"], row.get("caption_key")), {})[row["metric"]] = row
        for (task, key), metrics in table.items():
            acc = metrics["accuracy"]
            interval = "[{:.3f}, {:.3f}]".format(acc["ci_low"], acc["ci_high"]) if has_interval(acc) else "-"
            corrupt = f"  ({acc['n_corrupt']} corrupt images skipped)" if acc.get("n_corrupt") else ""
            corrupt += trained_on_note(acc)
            balanced = metrics.get("balanced_accuracy", {}).get("value")
            # none for a headline (pooled over tasks, it has no classes): a dash, not "nan"
            balanced_text = "-" if balanced is None or balanced != balanced else f"{balanced:.3f}"
            click.echo(
                f"{task:<34} {key or '-':<18} {acc['level']:<8} {acc['n_images']:>6} {acc['value']:>9.3f} "
                f"{interval:>15} {balanced_text:>8}{corrupt}"
            )
        for group, value in aggregate(alpha_rows).items():
            click.echo(f"  mean accuracy {group:<28} {value:.3f}")


@cli.command("tasks")
@click.option("--data", default="ubench", show_default=True, help=UBENCH_DATA_HELP)
@click.option("--sources", type=click.Path(), help="TOML overriding the source metadata table.")
@click.option(
    "--tasks",
    "wanted",
    default="all",
    show_default=True,
    help="List only these (as eval's --tasks reads them): what a selection would score, before it runs.",
)
@friendly_errors
def tasks_command(data: str, sources: str | None, wanted: str) -> None:
    """List every task with its images, classes, caption keys and metadata groups."""
    from pathlib import Path

    from micromerge.eval.data import load_benchmark
    from micromerge.eval.source_metadata import load_source_table
    from micromerge.eval.task_selection import select_tasks
    from micromerge.eval.tasks import discover_tasks

    bench = load_benchmark(data)
    every = discover_tasks(bench.dataset, load_source_table(Path(sources) if sources else None))
    chosen = select_tasks(every, wanted)
    click.echo(
        f"{'task':<34} {'level':<6} {'images':>7} {'classes':>7}  {'caption keys':<34} "
        "domain / subdomain / modality / scale / taxonomy / in paper"
    )
    for task in chosen:
        g = task.groups
        keys = ",".join(q.key for q in task.questions) or "-"
        click.echo(
            f"{task.name:<34} {task.level:<6} {task.n_images:>7} {len(task.classes):>7}  {keys:<34} "
            f"{g.get('domain')} / {g.get('subdomain')} / {g.get('modality')} / {g.get('scale')} / "
            f"{g.get('taxonomy')} / {g.get('paper')}"
        )
        for note in task.notes:
            click.echo(f"  note: {note}")


@cli.group("data")
def data_group() -> None:
    """Local copies of μ-Bench."""


@data_group.command("verify")
@click.argument("path", type=click.Path())
@click.option(
    "--expected",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON {shard name: sha256} to check against instead of the published checksums.",
)
@friendly_errors
def data_verify_command(path: str, expected: str | None) -> None:
    """Check a local copy's shards against the published SHA-256 of jnirschl/uBench's seven shards."""
    import json
    from pathlib import Path

    from micromerge.core.errors import MicromergeError
    from micromerge.eval.hub_layout import PUBLISHED_SHARDS, checked_checksums, find_hub_layout, verify_shards

    if not Path(path).exists():
        raise MicromergeError(
            f"{path}: no such folder (pass a copy of the Hub's perception/0.1.0, or its parent)"
        )
    folder = find_hub_layout(Path(path)) if Path(path).is_dir() else None
    if folder is None:
        raise MicromergeError(
            f"{path}: no μ-Bench shard folder (perception/0.1.0 with dataset_info.json) here"
        )
    checksums = PUBLISHED_SHARDS
    if expected:
        try:
            loaded = json.loads(Path(expected).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MicromergeError(
                f"--expected {expected}: not a JSON object of shard checksums ({exc})"
            ) from exc
        checksums = checked_checksums(loaded, f"--expected {expected}")
    report = []
    for name, status in verify_shards(folder, checksums):
        click.echo(f"{name}  {status}")
        report.append((name, status))
    bad = [name for name, status in report if status != "ok"]
    if bad:
        raise MicromergeError(
            f"{folder}: {len(bad)} of {len(report)} shard(s) differ, are missing or unexpected: {', '.join(bad)}"
        )
    click.echo(f"{folder}: all {len(report)} shards match")


@cli.command("eval")
@click.option("--model", required=True, help="Checkpoint: zoo name, hf-hub: id, file or folder.")
@_eval_options
@friendly_errors
def eval_command(model: str, **values: Any) -> None:
    """Zero-shot evaluation of one checkpoint on every μ-Bench task."""
    from micromerge.core.devices import resolve_device
    from micromerge.eval.engine import run_eval
    from micromerge.merging.sources import CheckpointAccess

    settings, state = _eval_settings(values)
    if not state.is_main_process:
        return  # one model is one process's work: under `accelerate launch` each did it all and printed it
    access = CheckpointAccess(values["allow_pickle"], values["arch"])
    rows = run_eval(model, settings, resolve_device(values["device"]), access)
    _print_table(rows)
    click.echo(f"\nresults in {settings.store}")


@cli.command("sweep")
@click.option("--base", required=True)
@click.option("--ft", "finetuned", multiple=True, required=True)
@click.option("--method", default="wise-ft", show_default=True, help=METHOD_HELP)
@click.option("--alphas", default="0:1:0.1", show_default=True, help="START:STOP:STEP or a,b,c.")
@click.option("--weights", help="linear: comma-separated weights.")
@method_options
@statistics_data_options
@INCLUDE
@EXCLUDE
@click.option("--alpha-rule", "alpha_rules", multiple=True, help="PATTERN=VALUE: a per-key alpha.")
@_eval_options
@friendly_errors
def sweep_command(base: str, finetuned: tuple[str, ...], method: str, alphas: str, **values: Any) -> None:
    """Evaluate a merge at every alpha on every task (resumable; `accelerate launch` splits alphas)."""
    from micromerge.core.devices import resolve_device
    from micromerge.eval.engine import SweepPlan, run_sweep
    from micromerge.merging.job import job_from_mapping, warn_of_a_variant_with_one_finetuned
    from micromerge.merging.methods import TUNABLE

    job = job_from_mapping(
        {
            "base": base,
            "finetuned": list(finetuned),
            "method": method,
            "alphas": alphas,
            "weights": values.pop("weights"),
            **{name: values.pop(name) for name in TUNABLE},
            "base_data": values.pop("base_data"),
            "ft_data": list(values.pop("ft_data")),
            "seed": values["seed"],
            "include": list(values.pop("include")),
            "exclude": list(values.pop("exclude")),
            "alpha_rules": list(values.pop("alpha_rules")),
            "allow_pickle": values["allow_pickle"],
            "arch": values["arch"],
        }
    )
    warn_of_a_variant_with_one_finetuned(job)
    settings, state = _eval_settings(values)
    plan = SweepPlan(
        job.base, job.finetuned, job.spec, job.alphas or (), job.access, model_data=job.model_data
    )
    rows = run_sweep(plan, settings, resolve_device(values["device"]), state.wait_for_everyone)
    state.wait_for_everyone()
    if state.is_main_process:
        _print_table(run_sweep_rows(settings, rows))
        click.echo(f"\nresults in {settings.store}")


@cli.command("soup")
@click.option("--base", required=True)
@click.option("--ft", "finetuned", multiple=True, required=True, help="A fine-tuned model (repeat).")
@INCLUDE
@EXCLUDE
@click.option("--out", type=click.Path(), help="Also write the chosen soup as a checkpoint (+ manifest).")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@_eval_options
@friendly_errors
def soup_command(
    base: str, finetuned: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...], **values: Any
) -> None:
    """Greedy soup of the base and the fine-tuned models, chosen on the select half, reported on the other."""
    from micromerge.analysis.soup import check_soup_out, greedy_soup, write_soup
    from micromerge.core.devices import resolve_device
    from micromerge.merging.rules import KeyRules
    from micromerge.merging.sources import CheckpointAccess

    out, force = values.pop("out"), values.pop("force")
    settings, state = _eval_settings(values)
    if not state.is_main_process:
        return  # one process chooses: each step depends on the last
    access = CheckpointAccess(values["allow_pickle"], values["arch"])
    if out:
        check_soup_out(Path(out), force, (base, *finetuned))
    result = greedy_soup(
        base,
        finetuned,
        settings,
        resolve_device(values["device"]),
        KeyRules(tuple(include), tuple(exclude)),
        access=access,
    )
    for step in result.steps:
        verdict = "kept" if step.kept else "left out"
        click.echo(f"{100 * step.select_mean:6.2f}%  (select half)  + {step.ingredient}: {verdict}")
    weights = ", ".join(f"{w:.3g}" for w in result.weights)
    click.echo(
        f"soup weights (base, ft...): {weights}; report half: {100 * result.report_mean:.2f}% all-task mean"
    )
    click.echo(f"results in {settings.store} (run {result.run_id})")
    if out:
        rules = KeyRules(tuple(include), tuple(exclude))
        written = write_soup(result, Path(out), force, rules, progress=settings.progress, access=access)
        click.echo(f"wrote {written.path} (manifest {written.manifest_path.name})")


def run_sweep_rows(settings: EvalSettings, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All rows of this run once every process has finished (each process returns its view)."""
    from micromerge.eval.store import ResultStore

    store = ResultStore(settings.store)
    return [row for run_id in sorted({r["run_id"] for r in rows}) for row in store.rows(run_id)]


def _finetune_options(func: Command) -> Command:
    options = [
        click.option("--base", help="Checkpoint to start from: zoo name, hf-hub: id, file or folder."),
        click.option(
            "--data",
            help="Training data (see README): a CSV/TSV/JSONL caption table or a folder with one, saved "
            "dataset, .tar shards or a shard pattern/URL, a hub dataset id or a local copy of one (parquet "
            "files, streamed). A table or dataset made for another tool: "
            "'PATH#image=COLUMN,caption=COLUMN,sep=tab,root=IMAGE_FOLDER'.",
        ),
        click.option(
            "--out",
            type=click.Path(),
            help="Run folder (model.safetensors, manifest.json, train_log.jsonl, state/).",
        ),
        ARCH,
        click.option("--epochs", type=int, default=1, show_default=True),
        click.option(
            "--max-steps", type=int, help="Stop after this many optimizer steps (overrides --epochs)."
        ),
        click.option("--batch-size", type=int, default=64, show_default=True, help="Per process."),
        click.option(
            "--accum-steps",
            type=int,
            default=1,
            show_default=True,
            help="Micro-batches per step; contrastive: one loss over all of them (open_clip_train's --accum-freq).",
        ),
        click.option("--lr", type=float, default=1e-4, show_default=True),
        click.option(
            "--weight-decay",
            type=float,
            default=0.1,
            show_default=True,
            help="Not applied to gains, biases, norms and the logit scale (open_clip_train's rule).",
        ),
        click.option("--warmup-steps", type=int, default=0, show_default=True),
        click.option("--grad-clip", type=float, default=1.0, show_default=True, help="0 disables."),
        SEED,
        click.option(
            "--precision",
            type=click.Choice(["no", "bf16", "fp16"]),
            default="bf16",
            show_default=True,
            help="Mixed precision on GPU.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="auto, cpu or cuda (the GPU accelerate gives each process; pick one with CUDA_VISIBLE_DEVICES).",
        ),
        click.option(
            "--save-every",
            type=int,
            default=100,
            show_default=True,
            help="Checkpoint every N steps (0: final only).",
        ),
        click.option("--freeze", multiple=True, help="Freeze parameters matching this glob (repeatable)."),
        click.option(
            "--max-bad-fraction",
            type=float,
            default=0.05,
            show_default=True,
            help="Stop if more images than this are unreadable.",
        ),
        click.option(
            "--domain",
            help="What the specialist is for (e.g. pathology); recorded for analysis "
            "(supervised: default, the trained task's domain).",
        ),
        click.option(
            "--data-in-memory",
            type=click.Choice(["auto", "yes", "no"]),
            default="auto",
            show_default=True,
            help="Decode every image once into memory, or stream (read, decode and augment per batch in "
            "--workers processes); auto: in memory when the decoded images fit in 4 GiB and nothing is augmented.",
        ),
        click.option(
            "--augment",
            multiple=True,
            type=click.Choice(["crop", "flip", "rot90", "stain-jitter"]),
            help="Augment each image (repeat, applied in order): crop = open_clip's random resized crop; "
            "flip, rot90 = microscopy's symmetries; stain-jitter = small colour jitter (pathology). Streams.",
        ),
        click.option(
            "--workers", type=int, default=2, show_default=True, help="Data worker processes when streaming."
        ),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--force", is_flag=True, help="Discard the run in --out and start over."),
        ALLOW_PICKLE,
        click.option(
            "--config",
            "config_file",
            type=click.Path(),
            help="TOML/YAML with a [finetune] table; flags override it.",
        ),
        QUIET,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run_finetune(ctx: click.Context, mode: str, values: dict[str, Any]) -> None:
    from micromerge.core.config_files import load_section
    from micromerge.core.config_schema import FINETUNE_SCHEMA
    from micromerge.finetune.config import config_from_mapping
    from micromerge.finetune.trainer import run_finetune

    config_file, quiet = values.pop("config_file"), values.pop("quiet")
    mapping: dict[str, Any] = {}
    if config_file:
        mapping.update(load_section(config_file, "finetune", FINETUNE_SCHEMA))
    if mapping.get("mode", mode) != mode:  # the subcommand is the mode: the file's was overridden, silently
        raise MicromergeError(
            f"{config_file} [finetune]: mode = {mapping['mode']!r}, but this is `finetune {mode}`; "
            f"run `finetune {mapping['mode']}`, or remove mode"
        )
    mapping.update({k: v for k, v in values.items() if k not in mapping and v not in ((), None)})
    mapping.update(explicit_options(ctx, values))
    mapping = {k: (list(v) if isinstance(v, tuple) else v) for k, v in mapping.items() if v is not None}
    mapping.update(mode=mode, progress=not quiet)
    path = run_finetune(config_from_mapping(mapping))
    click.echo(f"wrote {path} (manifest {path.parent / 'manifest.json'})")


@cli.group("finetune")
def finetune_group() -> None:
    """Make domain-specialist checkpoints (accelerate: CPU, GPU bf16, DDP via `accelerate launch`)."""


@finetune_group.command("contrastive")
@_finetune_options
@click.option("--freeze-text/--train-text", default=None, help="Freeze the text tower (default: train it).")
@click.pass_context
@friendly_errors
def finetune_contrastive(ctx: click.Context, **values: Any) -> None:
    """CLIP InfoNCE on image-caption pairs (how PLIP and QuiltNet were made)."""
    _run_finetune(ctx, "contrastive", values)


@finetune_group.command("supervised")
@_finetune_options
@click.option(
    "--task",
    help="The one task of --data (a μ-Bench-schema dataset) to train on: a name, or a pattern or group naming one.",
)
@click.option(
    "--freeze-text/--train-text", default=None, help="Freeze the text tower (default: frozen, as in WiSE-FT)."
)
@click.option(
    "--lp-epochs",
    type=int,
    default=0,
    show_default=True,
    help="Train the head alone first for N epochs (LP-FT).",
)
@click.pass_context
@friendly_errors
def finetune_supervised(ctx: click.Context, **values: Any) -> None:
    """Cross-entropy through a head initialised from the class text embeddings (the zero-shot head)."""
    _run_finetune(ctx, "supervised", values)


@cli.command("demo")
@click.option(
    "--out",
    type=click.Path(),
    default="demo-out",
    show_default=True,
    help="Where data, checkpoints, results and the report go.",
)
@SEED
@click.option(
    "--bench-per-class", type=int, default=40, show_default=True, help="Benchmark images per class."
)
@click.option(
    "--corpus-per-class", type=int, default=300, show_default=True, help="Training pairs per class."
)
@click.option("--pretrain-epochs", type=int, default=4, show_default=True)
@click.option("--finetune-epochs", type=int, default=3, show_default=True)
@click.option("--bootstrap", type=int, default=500, show_default=True)
@click.option("--fresh", is_flag=True, help="Start over instead of reusing finished stages.")
@QUIET
@friendly_errors
def demo_command(out: str, quiet: bool, **values: Any) -> None:
    """The whole loop offline: synthetic μ-Bench -> tiny CLIP -> specialist -> sweeps -> report."""
    from pathlib import Path

    from micromerge.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=Path(out), progress=not quiet, **values))


@cli.command("report")
@click.argument("results", type=click.Path())
@click.option("--out", type=click.Path(), default="report", show_default=True)
@click.option(
    "--target",
    help="Target group, e.g. domain:pathology (default: the domain in the fine-tuned checkpoint's manifest).",
)
@click.option(
    "--metric",
    type=click.Choice(["accuracy", "balanced_accuracy", "macro_f1"]),
    default="accuracy",
    show_default=True,
)
@click.option(
    "--run-figures/--no-run-figures",
    default=None,
    help="Draw each run's own figures (per-task grid, heat map). Default: drawn up to 12 runs; beyond, "
    "only when asked, and the page links its figures instead of embedding them. (Beyond 4 runs, runs are "
    "compared per comparison set: the same models, rules, data, protocol and target.)",
)
@click.option(
    "--runs",
    "selected",
    multiple=True,
    help="Report only the runs whose label or run id matches this glob (repeatable), e.g. "
    "'clip-b32+plip / *' for one pair of an ablation grid. Default: every run.",
)
@click.option(
    "--baseline",
    help="An evaluated model (its name in the models table, label or run id; globs allowed) the others "
    "are compared with, group by group: e.g. the base CLIP against PLIP and QuiltNet.",
)
@friendly_errors
def report_command(
    results: str,
    out: str,
    target: str | None,
    metric: str,
    run_figures: bool | None,
    selected: tuple[str, ...],
    baseline: str | None,
) -> None:
    """Markdown + HTML report (figures, tables, provenance) from a results store: sweeps' forgetting
    and recovery, and every evaluated model side by side (a store of `eval` runs only gets just
    that); self-contained up to 12 runs."""
    from micromerge.analysis.report import build_report

    click.echo(f"wrote {build_report(results, out, target, metric, run_figures, selected, baseline)}")


@cli.command("ablate")
@click.argument("config", type=click.Path())
@DEVICE
@CACHE_DIR
@QUIET
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the grid against its checkpoints and list its runs; evaluate nothing.",
)
@friendly_errors
def ablate_command(config: str, device: str, cache_dir: str | None, quiet: bool, dry_run: bool) -> None:
    """Run a grid (pairs x methods x alphas x rule sets) from a TOML/YAML file through sweep and report
    (`accelerate launch` shares it between processes)."""
    from accelerate import PartialState

    from micromerge.analysis.ablate import (
        check_grid_against_checkpoints,
        describe_grid,
        load_ablation,
        plan_grid,
        refuse_grid_halves,
        run_ablation,
    )
    from micromerge.core.devices import resolve_device
    from micromerge.core.hashing import default_cache_dir
    from micromerge.eval.data import load_benchmark

    ablation = load_ablation(config)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if dry_run:  # the list first: it needs no checkpoint, and offline the check may not reach one
        jobs, skipped = plan_grid(ablation)
        click.echo("\n".join(describe_grid(ablation, jobs, skipped)))
        halves = check_grid_against_checkpoints(jobs)

        def fingerprint() -> str:
            return load_benchmark(ablation.data, cache_dir=cache, progress=not quiet).fingerprint

        refuse_grid_halves(halves, fingerprint, ablation.seed)
        return
    state = PartialState(cpu=device == "cpu")
    html = run_ablation(
        ablation,
        cache,
        resolve_device(device),
        progress=not quiet and state.is_main_process,
        rank=state.process_index,
        world_size=state.num_processes,
        wait_for_everyone=state.wait_for_everyone,
    )
    if html is not None:
        click.echo(f"wrote {html}")


if __name__ == "__main__":  # `python -m micromerge.cli` / `accelerate launch -m micromerge.cli`
    main()

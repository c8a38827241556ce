"""`micromerge ablate CONFIG`: every key of the config reaches the grid as written, relative paths
resolve against the config's folder, the defaults are the documented ones, and `run_ablation` hands
the grid's settings, labels and per-model corpora to the sweep, the soup and the report.

The end-to-end ablation tests (test_analysis, test_greedy_soup, test_learned_merging) show the grid
runs; these show it runs *what the config says* (mutation audit round 12: a dropped key, an
unresolved path or a default changed in `load_ablation` passed every end-to-end test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from micromerge.analysis import ablate
from micromerge.analysis.ablate import Ablation, SoupJob, grid_jobs, load_ablation, run_ablation
from micromerge.core.errors import MicromergeError
from micromerge.eval.settings import EvalSettings
from micromerge.merging.job import MergeJob
from micromerge.merging.rules import KeyRules
from micromerge.merging.sources import CheckpointAccess

FULL = """[ablation]
data = "../bench"
store = "./out/r.jsonl"
report = "./out/report"
alphas = "0,0.5"
methods = ["wise-ft", "fisher", "greedy-soup"]
tasks = "fine"
protocol = "closed-set"
prompts = "captions"
sources = "./sources.toml"
precision = "fp32"
bootstrap = 47
seed = 3
batch_size = 5
target = "domain:pathology"
run_figures = false

[ablation.method_parameters.fisher]
samples = 12

[[ablation.pairs]]
base = "../base.safetensors"
finetuned = "./ft.safetensors"
base_data = "../base-corpus"
ft_data = ["./ft-corpus"]

[[ablation.pairs]]
name = "absolute"
base = "/abs/base.safetensors"
finetuned = ["/abs/a.safetensors", "/abs/b.safetensors"]
allow_pickle = true
arch = "nano-clip"

[ablation.rule_sets.vision]
include = ["visual.*"]
exclude = ["visual.proj"]
"""

MINIMAL = """[ablation]
data = "/d"
store = "/s.jsonl"
report = "/r"
methods = ["wise-ft"]

[[ablation.pairs]]
base = "/b.safetensors"
finetuned = ["/f.safetensors"]
"""


def _load_full(tmp_path: Path) -> Ablation:
    """FULL, whose two-specialist pair cannot take WiSE-FT: the grid says so once, as it skips it."""
    with pytest.warns(UserWarning, match=r"absolute / wise-ft / vision: skipped \(wise-ft takes at most 1"):
        return load_ablation(_config(tmp_path, FULL))


def _config(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    path = folder / "grid.toml"
    path.write_text(text)
    (folder / "sources.toml").write_text('[sources.kather_et_al_2016]\nscale = "tissue"\n')  # FULL's
    return path


def test_every_key_reaches_the_ablation_and_relative_paths_resolve_against_the_config(tmp_path):
    """'./' and '../' are the config's folder (so a config in configs/ names files beside it); a
    path without them is left as written (a zoo name, hf-hub: id, or a path from the working folder)."""
    folder = tmp_path / "configs"
    ablation = _load_full(tmp_path)
    assert ablation == Ablation(
        data=str(folder / "../bench"),
        store=folder / "./out/r.jsonl",
        report=folder / "./out/report",
        alphas="0,0.5",
        pairs=(
            {
                "name": "../base.safetensors",
                "base": str(folder / "../base.safetensors"),
                "finetuned": [str(folder / "./ft.safetensors")],
                "access": CheckpointAccess(),
                "own_data": {
                    "base_data": str(folder / "../base-corpus"),
                    "ft_data": [str(folder / "./ft-corpus")],
                },
            },
            {
                "name": "absolute",
                "base": "/abs/base.safetensors",
                "finetuned": ["/abs/a.safetensors", "/abs/b.safetensors"],
                "access": CheckpointAccess(allow_pickle=True, arch="nano-clip"),
                "own_data": {"base_data": None, "ft_data": []},
            },
        ),
        methods=("wise-ft", "fisher", "greedy-soup"),
        rule_sets={"vision": {"include": ["visual.*"], "exclude": ["visual.proj"]}},
        tasks="fine",
        protocol="closed-set",
        prompts="captions",
        sources=folder / "./sources.toml",
        precision="fp32",
        bootstrap=47,
        seed=3,
        batch_size=5,
        target="domain:pathology",
        method_parameters={"fisher": {"samples": 12}},
        run_figures=False,
    )


def test_defaults_are_the_documented_ones(tmp_path):
    ablation = load_ablation(_config(tmp_path, MINIMAL))
    assert (ablation.alphas, ablation.rule_sets, ablation.tasks, ablation.protocol) == (
        "0:1:0.1",
        {"all": {}},
        "all",
        "ubench",
    )
    assert (ablation.bootstrap, ablation.seed, ablation.batch_size, ablation.target) == (1000, 0, 256, None)
    assert ablation.method_parameters == {}
    assert ablation.pairs[0]["name"] == "/b.safetensors", "a pair without a name is named by its base"


@pytest.mark.parametrize("key", ["data", "store", "report", "pairs", "methods"])
def test_a_missing_or_empty_required_key_is_named(tmp_path, key):
    lines = MINIMAL.replace("methods = [", "methods = [] #[") if key == "methods" else MINIMAL
    if key == "pairs":
        lines = lines.split("[[ablation.pairs]]")[0] + "pairs = []\n"
    elif key != "methods":
        lines = "\n".join(line for line in lines.splitlines() if not line.startswith(f"{key} ="))
    with pytest.raises(MicromergeError, match=rf"grid.toml: \[ablation\] needs '{key}'"):
        load_ablation(_config(tmp_path, lines))


@pytest.mark.parametrize(
    "pair, needle",
    [
        ('base = "/b"', "every pair needs base and finetuned"),
        ('finetuned = ["/f"]', "every pair needs base and finetuned"),
        ('base = "/b"\nfinetuned = ["/f"]\nft = "/g"', r"unknown key\(s\) \['ft'\]"),
        ('base = "/b"\nfinetuned = ["/f"]\nallow_pickle = "yes"', r"pair /b: allow_pickle must be a boolean"),
        ('base = "/b"\nfinetuned = ["/f"]\narch = 3', r"pair /b: arch must be a string"),
        # these ran into an AttributeError traceback, or a path of a number, later in the grid
        ('base = "/b"\nfinetuned = [1]', r"pair /b: finetuned must be a string or a list of strings"),
        ('name = 3\nbase = "/b"\nfinetuned = ["/f"]', r"pair 3: name must be a string"),
        ('base = "/b"\nfinetuned = ["/f"]\nft_data = "/c"', r"pair /b: ft_data must be a list of strings"),
    ],
)
def test_a_bad_pair_is_named(tmp_path, pair, needle):
    text = MINIMAL.split("[[ablation.pairs]]")[0] + f"[[ablation.pairs]]\n{pair}\n"
    with pytest.raises(MicromergeError, match=needle):
        load_ablation(_config(tmp_path, text))


def test_two_pairs_of_one_name_and_parameters_of_a_method_outside_the_grid_are_named(tmp_path):
    """Two pairs named alike (or unnamed with one base) wrote their results under the same labels;
    `method_parameters.tie` (a typo) was ignored, leaving TIES at its defaults."""
    second = '[[ablation.pairs]]\nbase = "/b.safetensors"\nfinetuned = ["/g.safetensors"]\n'
    with pytest.raises(MicromergeError, match=r"grid.toml: pair name '/b.safetensors' is used twice"):
        load_ablation(_config(tmp_path, MINIMAL + second))
    typo = MINIMAL + "[ablation.method_parameters.tie]\ndensity = 0.3\n"
    with pytest.raises(MicromergeError, match=r"grid.toml: method_parameters.tie: --method tie: unknown"):
        load_ablation(_config(tmp_path, typo))
    outside = MINIMAL + "[ablation.method_parameters.ties]\ndensity = 0.3\n"
    with pytest.warns(
        UserWarning, match=r"method_parameters.ties: ties is not in methods \['wise-ft'\]; unused"
    ):
        load_ablation(_config(tmp_path, outside))


def test_alphas_given_as_a_list_are_the_same_grid_as_the_string(tmp_path):
    """The schema accepts `alphas = [0, 0.5]`; it was turned into the string "[0, 0.5]", which the
    sweep then refused ("--alphas '[0': expected a number")."""
    listed = load_ablation(_config(tmp_path, MINIMAL.replace("methods =", "alphas = [0, 0.5]\nmethods =")))
    assert [job.alphas for _, job in grid_jobs(listed)] == [(0.0, 0.5)]


@pytest.mark.parametrize(
    "line, needle",
    [
        # an empty list: every sweep of the grid evaluated nothing, and the report was written
        ("alphas = []", r"grid.toml: --alphas \[\]: no values"),
        ('alphas = ""', r"grid.toml \[ablation\]: alphas = '' is empty; give a value, or remove alphas"),
        # the report refused these, but only once every sweep of the grid had run
        (
            'target = "pathology"',
            r"grid.toml: target 'pathology': expected level:coarse\|fine or one of domain:",
        ),
        ('target = "domain:"', r"grid.toml: target 'domain:': expected"),
        ('target = "organ:liver"', r"grid.toml: target 'organ:liver': expected"),
        # how the grid scores, checked as eval checks its flags: before the first evaluation
        ('precision = "fp16"', r"grid.toml: --precision 'fp16': expected one of bf16, fp32"),
        ('prompts = "templates"', r"grid.toml: --prompts 'templates': expected one of names, captions"),
        ('prompts = "captions"', r"grid.toml: --prompts captions: applies to --protocol closed-set only"),
        ('protocol = "zero-shot"', r"grid.toml: --protocol 'zero-shot': expected one of ubench, closed-set"),
        ('sources = "./absent.toml"', r"--sources .*absent.toml: not a readable TOML file"),
    ],
)
def test_an_empty_alpha_list_or_a_target_of_no_group_kind_is_refused_at_load(tmp_path, line, needle):
    with pytest.raises(MicromergeError, match=needle):
        load_ablation(_config(tmp_path, MINIMAL.replace("methods =", f"{line}\nmethods =")))


def _task_row(task: str, level: str, **groups: str) -> dict:
    """A stored evaluation row, as much of it as the report's task table reads."""
    numbers = {"metric": "accuracy", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n_images": 10}
    return {"alpha": None, "task": task, "level": level, "groups": groups, **numbers}


EVALUATED = [
    _task_row("domain", "coarse"),
    _task_row("breakhis", "fine", domain="pathology", subdomain="breast pathology"),
    _task_row("cell-cycle", "fine", domain="biology", modality="fluorescence microscopy"),
]


def test_a_target_that_is_no_group_of_the_benchmark_stops_the_grid_before_its_first_sweep(
    tmp_path, monkeypatch
):
    """`target = "domain:patholgy"`: checked against the groups of the first evaluation's tasks,
    so the grid stops after one evaluation, not after every sweep (the report's own check)."""
    calls: list[str] = []
    monkeypatch.setattr(ablate, "check_grid_against_checkpoints", lambda jobs: calls.append("check"))
    monkeypatch.setattr(ablate, "prepare", lambda settings: None)
    monkeypatch.setattr(ablate, "run_eval", lambda *args: calls.append("eval") or EVALUATED)
    monkeypatch.setattr(ablate, "run_sweep", lambda *args: calls.append("sweep"))
    monkeypatch.setattr(ablate, "build_report", lambda *args, **kwargs: calls.append("report"))
    for target in ("domain:patholgy", "subdomain:breast", "modality:electron microscopy"):
        text = MINIMAL.replace("methods =", f'target = "{target}"\nmethods =')
        with pytest.raises(MicromergeError, match=rf"target '{target}': not a group of the tasks of /d"):
            run_ablation(load_ablation(_config(tmp_path, text)), tmp_path, torch.device("cpu"), False)
        assert calls == ["check", "eval"], calls
        calls.clear()
    for target in ("domain:pathology", "subdomain:breast pathology", "level:coarse"):
        text = MINIMAL.replace("methods =", f'target = "{target}"\nmethods =')
        run_ablation(load_ablation(_config(tmp_path, text)), tmp_path, torch.device("cpu"), False)
        assert calls == ["check", "eval", "eval", "sweep", "report"], calls
        calls.clear()


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("[ablation.method_parameters]\nties = 3", "method_parameters.ties must be a table, not 3"),
        # an unknown method is named before anything about its parameters
        ("[ablation.method_parameters]\ntis = 3", "--method tis: unknown merge method"),
        ("[ablation.rule_sets]\nodd = 3", "rule_sets.odd must be a table, not 3"),
        ('[ablation.rule_sets.odd]\nkeep = ["x"]', r"rule set 'odd'.*unknown key\(s\) \['keep'\]"),
        ('[ablation.rule_sets.odd]\ninclude = "visual.*"', "include"),
        ("[ablation.method_parameters.ties]\nwindow = 3", r"ties / all: unknown key\(s\) \['window'\]"),
        ("[ablation.method_parameters.ties]\nbeta = 0.5", "--beta: ties does not use it"),
        (
            "[ablation.method_parameters.ties]\nallow_pickle = true",
            r"method_parameters.ties.allow_pickle: .* a pair's setting",
        ),
        # every sweep sets its own alpha: a method's alpha changed nothing
        (
            "[ablation.method_parameters.ties]\nalpha = 0.25",
            r"method_parameters.ties.alpha: every merge of the grid",
        ),
    ],
)
def test_bad_tables_in_the_grid_are_named(tmp_path, extra, needle):
    method = "tis" if "tis =" in extra else "ties"
    text = MINIMAL.replace('methods = ["wise-ft"]', f'methods = ["{method}"]') + extra + "\n"
    with pytest.raises(MicromergeError, match=needle):
        load_ablation(_config(tmp_path, text))


def test_a_method_without_an_alpha_is_refused_in_a_grid_of_alphas(tmp_path):
    """linear weighs the models by --weights: every alpha of its sweep was the same merge."""
    text = MINIMAL.replace('methods = ["wise-ft"]', 'methods = ["wise-ft", "linear"]')
    with pytest.raises(MicromergeError, match=r"grid.toml: methods: linear takes no alpha, so its sweep"):
        load_ablation(_config(tmp_path, text))


def test_the_grid_gives_each_method_what_it_takes(tmp_path):
    """alphas and seed from the ablation, method parameters and rule sets merged into each job; the
    pair's own corpora only for Fisher/RegMean (other methods would refuse them); a soup gets the
    rule set's include/exclude."""
    ablation = _load_full(tmp_path)
    jobs = dict(grid_jobs(ablation))
    assert len(jobs) == 2 * 3 - 1 and "absolute / wise-ft / vision" not in jobs, (
        "WiSE-FT takes one specialist"
    )
    folder = tmp_path / "configs"
    wise = jobs["../base.safetensors / wise-ft / vision"]
    assert isinstance(wise, MergeJob)
    assert wise.alphas == (0.0, 0.5) and wise.spec.params.seed == 3
    assert jobs["../base.safetensors / fisher / vision"].spec.params.samples == 12
    assert wise.spec.rules == KeyRules(("visual.*",), ("visual.proj",))
    assert wise.model_data == ()
    fisher = jobs["../base.safetensors / fisher / vision"]
    assert isinstance(fisher, MergeJob)
    assert fisher.model_data == (str(folder / "../base-corpus"), str(folder / "./ft-corpus"))
    assert jobs["absolute / fisher / vision"].model_data == ()
    soup = jobs["absolute / greedy-soup / vision"]
    assert soup == SoupJob(
        "/abs/base.safetensors",
        ("/abs/a.safetensors", "/abs/b.safetensors"),
        KeyRules(("visual.*",), ("visual.proj",)),
        CheckpointAccess(allow_pickle=True, arch="nano-clip"),
    )
    assert wise.access == CheckpointAccess()
    assert jobs["absolute / fisher / vision"].access == CheckpointAccess(True, "nano-clip")


def test_rule_sets_override_method_parameters(tmp_path):
    text = MINIMAL + '[ablation.method_parameters.wise-ft]\ninclude = ["text.*"]\n'
    text += '[ablation.rule_sets.vision]\ninclude = ["visual.*"]\n'
    (job,) = (job for _, job in grid_jobs(load_ablation(_config(tmp_path, text))))
    assert job.spec.rules.include == ("visual.*",)


def test_run_ablation_hands_the_configs_settings_to_every_step(tmp_path, monkeypatch):
    """The wiring, recorded: reference models once per pair with the ablation's settings (dealt out
    between processes), one sweep per job with its label and per-model corpora, the soup on rank 0
    only, and the report for the configured target, on rank 0, after every process has finished."""
    calls: list[tuple] = []
    prepared = object()  # stands for the benchmark and its tasks, loaded once for the whole grid
    preparations: list[EvalSettings] = []
    checked: list[list[str]] = []
    monkeypatch.setattr(
        ablate, "check_grid_against_checkpoints", lambda jobs: checked.append([label for label, _ in jobs])
    )
    monkeypatch.setattr(ablate, "prepare", lambda settings: preparations.append(settings) or prepared)
    handed: list[object] = []
    monkeypatch.setattr(
        ablate,
        "run_eval",
        lambda model, settings, device, access, ready: (
            handed.append(ready) or calls.append(("eval", model, settings, access)) or EVALUATED
        ),
    )
    monkeypatch.setattr(
        ablate,
        "run_sweep",
        lambda plan, settings, device, wait, ready: (
            handed.append(ready) or calls.append(("sweep", plan, settings, wait))
        ),
    )
    monkeypatch.setattr(
        ablate, "greedy_soup", lambda *args: handed.append(args[-1]) or calls.append(("soup", *args[:-1]))
    )
    monkeypatch.setattr(
        ablate,
        "build_report",
        lambda store, report, target, run_figures: calls.append(("report", target, run_figures)),
    )
    ablation = _load_full(tmp_path)
    run_ablation(ablation, tmp_path / "cache", torch.device("cpu"), progress=False, rank=1, world_size=2)

    expected = EvalSettings(
        data=ablation.data,
        store=ablation.store,
        cache_dir=tmp_path / "cache",
        tasks="fine",
        protocol="closed-set",
        prompts="captions",
        sources=ablation.sources,
        precision="fp32",
        batch_size=5,
        bootstrap=47,
        seed=3,
        progress=False,
        rank=1,
        world_size=2,
    )
    assert all(call[2] == expected for call in calls if call[0] in ("eval", "sweep"))
    assert preparations == [expected], "the benchmark is loaded once, not once per sweep"
    assert checked == [[label for label, _ in grid_jobs(ablation)]], "every run, checked once"
    assert handed == [prepared] * len(calls) and len(calls) > 3
    references = [
        *((m, CheckpointAccess()) for m in (ablation.pairs[0]["base"], *ablation.pairs[0]["finetuned"])),
        *(
            (m, CheckpointAccess(True, "nano-clip"))
            for m in (ablation.pairs[1]["base"], *ablation.pairs[1]["finetuned"])
        ),
    ]
    evaluated = [(call[1], call[3]) for call in calls if call[0] == "eval"]
    # the first (its rows check the target) in every process, the others dealt out: 1, 3 to rank 1
    assert evaluated == [references[0], references[1], references[3]]
    sweeps = {call[1].label: call[1] for call in calls if call[0] == "sweep"}
    assert set(sweeps) == {label for label, job in grid_jobs(ablation) if isinstance(job, MergeJob)}
    fisher = sweeps["../base.safetensors / fisher / vision"]
    assert fisher.model_data == dict(grid_jobs(ablation))["../base.safetensors / fisher / vision"].model_data
    assert fisher.alphas == (0.0, 0.5) and fisher.access == CheckpointAccess()
    assert sweeps["absolute / fisher / vision"].access == CheckpointAccess(True, "nano-clip")
    assert not [call for call in calls if call[0] == "soup"], "rank 1 of 2 leaves the soups to rank 0"
    assert calls[-1][0] == "sweep", "rank 1 of 2 leaves the report to rank 0"

    calls.clear()
    waited = lambda: calls.append(("waited",))  # noqa: E731
    run_ablation(ablation, tmp_path / "cache", torch.device("cpu"), False, 0, 2, wait_for_everyone=waited)
    assert [(call[1], call[3]) for call in calls if call[0] == "eval"] == [
        references[0],
        references[2],
        references[4],
    ]
    assert calls[-2:] == [("waited",), ("report", "domain:pathology", False)], (
        "the report once every process is done"
    )
    assert all(call[3] is waited for call in calls if call[0] == "sweep"), (
        "a data-aware sweep meets the others"
    )

    calls.clear()
    handed.clear()
    run_ablation(ablation, tmp_path / "cache", torch.device("cpu"), progress=False)
    assert [(call[1], call[3]) for call in calls if call[0] == "eval"] == references
    soups = [call for call in calls if call[0] == "soup"]
    steps = [call for call in calls if call[0] != "report"]
    assert soups and handed == [prepared] * len(steps), "the soups' candidates use it too"
    assert [call[-2] for call in soups] == [
        "../base.safetensors / greedy-soup / vision",
        "absolute / greedy-soup / vision",
    ]
    assert soups[1][1:3] == ("/abs/base.safetensors", ("/abs/a.safetensors", "/abs/b.safetensors"))
    assert soups[1][5] == KeyRules(("visual.*",), ("visual.proj",))
    assert [call[-1] for call in soups] == [CheckpointAccess(), CheckpointAccess(True, "nano-clip")]


def test_the_grid_deals_alphas_and_soups_in_turn_so_the_processes_finish_together(tmp_path, monkeypatch):
    """Every sweep was dealt from process 0 and every soup was process 0's: with 11 alphas on 8
    GPUs process 0 ran twice the alphas of process 7 in every sweep, and the others waited at the
    grid's end, long enough on μ-Bench for a barrier's timeout. Work is dealt on across the grid."""
    text = MINIMAL.replace(
        'methods = ["wise-ft"]', 'alphas = "0,0.5,1"\nmethods = ["wise-ft", "greedy-soup", "ties"]'
    )
    ablation = load_ablation(_config(tmp_path, text))
    monkeypatch.setattr(ablate, "check_grid_against_checkpoints", lambda jobs: None)
    monkeypatch.setattr(ablate, "prepare", lambda settings: None)
    monkeypatch.setattr(ablate, "run_eval", lambda *args: EVALUATED)
    monkeypatch.setattr(ablate, "build_report", lambda *args, **kwargs: None)
    # wise-ft's alphas from process 0 (on two: 0, 1 to it, 0.5 to 1); the soup is the 4th unit and
    # weighs two (its base and specialist), so ties's alphas are dealt from the 6th unit on. Two
    # processes cannot tell a soup of two units from one of none (both even): three can.
    expected = {
        2: {0: [0, 1], 1: [0, "soup", 1]},
        3: {0: [0, "soup", 2], 1: [0, 2], 2: [0, 2]},
    }
    for world, dealt in expected.items():
        work: dict[int, list] = {rank: [] for rank in range(world)}
        for rank, done in work.items():
            monkeypatch.setattr(
                ablate, "run_sweep", lambda plan, settings, device, wait, ready, done=done: done.append(plan)
            )
            monkeypatch.setattr(ablate, "greedy_soup", lambda *args, done=done: done.append("soup"))
            run_ablation(ablation, tmp_path, torch.device("cpu"), False, rank, world)
        assert {rank: [getattr(p, "first_process", p) for p in done] for rank, done in work.items()} == dealt


def test_ablate_under_a_launch_tells_the_grid_which_process_it_is(tmp_path, monkeypatch):
    """`accelerate launch ... ablate`: the command passed no rank, so every process ran the whole
    grid (every alpha of every sweep, every soup) and wrote the report, a process that finished
    first writing it without the others' alphas."""
    import accelerate
    from click.testing import CliRunner

    from micromerge.cli import cli

    class SecondOfTwo:  # PartialState in process 1 of a two-process launch
        process_index, num_processes, is_main_process = 1, 2, False

        def __init__(self, cpu: bool = False):
            self.waits = 0

        def wait_for_everyone(self):
            self.waits += 1

    received = {}

    def run(ablation, cache_dir, device, progress, rank, world_size, wait_for_everyone):
        received.update(rank=rank, world_size=world_size, progress=progress, wait=wait_for_everyone)

    monkeypatch.setattr(accelerate, "PartialState", SecondOfTwo)
    monkeypatch.setattr(ablate, "run_ablation", run)
    result = CliRunner().invoke(cli, ["ablate", str(_config(tmp_path, MINIMAL)), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (received["rank"], received["world_size"], received["progress"]) == (1, 2, False)
    received["wait"]()
    assert received["wait"].__self__.waits == 1, "the launch's own barrier"
    assert "wrote" not in result.output


@pytest.mark.slow
def test_two_processes_launched_share_the_grid_and_write_the_rows_one_process_writes(tmp_path):
    """`accelerate launch … ablate` for real (two gloo processes sharing one store): every row of
    the grid, numbers and intervals, is the one a single process writes, each once, and one report."""
    import json

    from tests.helpers import launch_failure, run_two_processes, write_checkpoint
    from tests.ubench_fixture import write_fixture

    bench = write_fixture(tmp_path / "bench", per_class=4)
    write_checkpoint(tmp_path / "base.safetensors", 0)
    write_checkpoint(tmp_path / "ft.safetensors", 1)

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'[ablation]\ndata = "{bench}"\nprotocol = "ubench"\ntasks = "all"\n'
            f'store = "{tmp_path / name / "results.jsonl"}"\nreport = "{tmp_path / name / "report"}"\n'
            'alphas = "0,0.5,1"\nmethods = ["wise-ft", "ties"]\nbootstrap = 40\ntarget = "domain:pathology"\n'
            f'[[ablation.pairs]]\nname = "pair"\nbase = "{tmp_path / "base.safetensors"}"\n'
            f'finetuned = ["{tmp_path / "ft.safetensors"}"]\n'
            '[ablation.rule_sets.all]\n[ablation.rule_sets.vision-only]\ninclude = ["visual.*"]\n'
        )
        return path

    launched = run_two_processes(
        "ablate", str(config("two")), "--device", "cpu", "--quiet", "--cache-dir", str(tmp_path / "c2")
    )
    assert launched.returncode == 0, launch_failure(launched)
    run_ablation(load_ablation(config("one")), tmp_path / "c1", torch.device("cpu"), progress=False)

    def rows(name: str) -> list[tuple]:
        lines = (tmp_path / name / "results.jsonl").read_text().splitlines()
        return sorted(
            (str(r.get("label")), str(r.get("model")), -1.0 if r["alpha"] is None else r["alpha"], r["task"],
             r["split"], r["metric"], str(r.get("caption_key")), r["value"], r.get("ci_low"), r.get("ci_high"))
            for r in map(json.loads, lines)
        )  # fmt: skip

    two, one = rows("two"), rows("one")
    assert two == one and len(set(two)) == len(two) > 0
    assert (tmp_path / "two" / "report" / "report.html").is_file()

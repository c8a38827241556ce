"""The numpy engine (no torch import) and the torch engine: same tensor bytes, and the right choice."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from micromerge.core.errors import MicromergeError
from micromerge.merging.in_memory import merge_state_dicts
from micromerge.merging.job import job_from_mapping, run_merge_job
from micromerge.merging.methods import METHODS
from tests.helpers import random_state_dict, write_checkpoint


def _checkpoint(path, seed, dtype=torch.float32):
    """A nano CLIP with an integer buffer, a logit_scale above the clamp, and weights in `dtype`."""
    tensors = {k: v.to(dtype) for k, v in random_state_dict(seed).items()}
    tensors["logit_scale"] = torch.tensor(4.0 + seed, dtype=dtype)  # seed 1: 5.0 > ln(100)
    tensors["position_ids"] = torch.arange(8) * (seed + 1)
    tensors["visual.proj"][0, 0] = 2e4 * (seed + 1)  # float16 rounding near its range
    save_file(tensors, str(path), metadata={"micromerge.arch": "nano-clip"})
    return tensors


def _split(path):
    """(header tensor entries, provenance record, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    metadata = header.pop("__metadata__")
    return header, json.loads(metadata["micromerge.core.provenance"]), raw[8 + length :]


def _merge(tmp_path, name, **values):
    job = job_from_mapping({"out": str(tmp_path / f"{name}.safetensors"), **values})
    (output,) = run_merge_job(job, progress=False)
    return output


@pytest.fixture
def checkpoints(tmp_path):
    return [str(tmp_path / f"m{seed}.safetensors") for seed in range(3)]


CASES = {
    "wise-ft-0.3": {"method": "wise-ft", "alpha": 0.3},
    "wise-ft-0.8-rules": {
        "method": "wise-ft",
        "alpha": 0.8,
        "alpha_rules": ["visual.*=0.45"],
        "exclude": ["transformer.resblocks.0.*"],
    },
    "linear-weights": {"method": "linear", "weights": "0.5,0.3,0.2", "extra_ft": True},
    "task-arithmetic": {"method": "task-arithmetic", "alpha": 0.6, "extra_ft": True},
    "task-negation-fp16-out": {"method": "task-arithmetic", "alpha": -0.5, "dtype": "float16"},
    "lines-depth-scaled": {"method": "lines", "alpha": 0.3, "beta": 0.6, "extra_ft": True},
}


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_numpy_and_torch_engines_write_identical_tensor_bytes(tmp_path, checkpoints, case, input_dtype):
    for seed, path in enumerate(checkpoints):
        _checkpoint(path, seed, input_dtype)
    values = dict(CASES[case])
    finetuned = checkpoints[1:] if values.pop("extra_ft", False) else checkpoints[1:2]
    values.update(base=checkpoints[0], finetuned=finetuned)
    outputs = {engine: _merge(tmp_path, engine, engine=engine, **values) for engine in ("numpy", "torch")}
    assert outputs["numpy"].manifest["engine"] == "numpy" and outputs["torch"].manifest["engine"] == "torch"
    header_np, record_np, data_np = _split(outputs["numpy"].path)
    header_pt, record_pt, data_pt = _split(outputs["torch"].path)
    assert header_np == header_pt
    assert data_np == data_pt
    assert record_np.pop("numpy_version") == np.__version__
    assert record_pt.pop("torch_version") == torch.__version__
    assert record_np == record_pt
    merged = load_file(str(outputs["numpy"].path))
    clamp = torch.tensor(np.log(100)).to(merged["logit_scale"].dtype)  # ln(100) as stored
    assert merged["logit_scale"] <= clamp
    assert torch.equal(merged["position_ids"], torch.arange(8))


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_wise_ft_endpoints_are_exactly_the_models(tmp_path, checkpoints, engine):
    base = _checkpoint(checkpoints[0], 0)
    ft = _checkpoint(checkpoints[1], 1)
    for alpha, expected in ((0.0, base), (1.0, ft)):
        output = _merge(
            tmp_path,
            f"{engine}-{alpha}",
            engine=engine,
            base=checkpoints[0],
            finetuned=[checkpoints[1]],
            alpha=alpha,
        )
        merged = load_file(str(output.path))
        for key, tensor in expected.items():
            if key != "logit_scale" and tensor.is_floating_point():  # integer buffers: the base's
                assert torch.equal(merged[key], tensor), (alpha, key)


@pytest.mark.parametrize(
    ("engine", "base_dtype", "ft_dtype"),
    [
        ("numpy", torch.float16, torch.float32),
        ("torch", torch.float16, torch.float32),
        ("torch", torch.float16, torch.bfloat16),
        ("numpy", torch.float32, torch.float16),
    ],
)
def test_inputs_of_two_float_dtypes_merge_into_the_one_that_holds_both(
    tmp_path, checkpoints, engine, base_dtype, ft_dtype
):
    """OpenAI's release is fp16 and its fine-tunes (PLIP, QuiltNet) fp32: the merge was saved in the
    base's fp16, rounding the fine-tune's part. Now it is fp32 (fp16 with bf16: fp32 too), and equals
    the formula computed in float32; copied buffers keep the base's dtype."""
    base = _checkpoint(checkpoints[0], 0, base_dtype)
    ft = _checkpoint(checkpoints[1], 1, ft_dtype)
    output = _merge(
        tmp_path, engine, engine=engine, base=checkpoints[0], finetuned=[checkpoints[1]], alpha=0.3
    )
    merged = load_file(str(output.path))
    assert output.manifest["output_dtype"] == ["float32", "int64"]
    for key, tensor in base.items():
        if key == "logit_scale" or not tensor.is_floating_point():
            continue
        assert merged[key].dtype == torch.float32, key
        expected = 0.7 * tensor.float() + 0.3 * ft[key].float()
        assert torch.allclose(merged[key], expected, rtol=1e-6, atol=1e-6), key
    assert torch.equal(merged["position_ids"], base["position_ids"])


def _engine_of(tmp_path, name, **values):
    return _merge(tmp_path, name, **values).manifest["engine"]


def test_auto_picks_numpy_only_when_nothing_needs_torch(tmp_path, checkpoints):
    _checkpoint(checkpoints[0], 0)
    _checkpoint(checkpoints[1], 1)
    pair = {"base": checkpoints[0], "finetuned": [checkpoints[1]]}
    assert _engine_of(tmp_path, "auto", **pair) == "numpy"
    assert _engine_of(tmp_path, "cpu", device="cpu", **pair) == "numpy"
    assert _engine_of(tmp_path, "ties", method="ties", **pair) == "torch"
    assert _engine_of(tmp_path, "slerp", method="slerp", **pair) == "torch"
    assert _engine_of(tmp_path, "bf16-out", dtype="bfloat16", **pair) == "torch"
    pt = tmp_path / "ft.pt"
    torch.save(load_file(checkpoints[1]), pt)
    assert _engine_of(tmp_path, "pickle", base=checkpoints[0], finetuned=[str(pt)]) == "torch"
    bf16 = tmp_path / "bf16.safetensors"
    save_file(
        {
            k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in load_file(checkpoints[1]).items()
        },
        str(bf16),
    )
    assert _engine_of(tmp_path, "bf16-in", base=checkpoints[0], finetuned=[str(bf16)]) == "torch"


def test_engine_numpy_says_why_it_cannot_run(tmp_path, checkpoints):
    _checkpoint(checkpoints[0], 0)
    _checkpoint(checkpoints[1], 1, torch.bfloat16)
    pair = {"base": checkpoints[0], "finetuned": [checkpoints[1]], "engine": "numpy"}
    with pytest.raises(MicromergeError, match="--engine numpy cannot run this merge: .*bfloat16"):
        _merge(tmp_path, "bf16", **pair)
    with pytest.raises(MicromergeError, match="--method dare is not elementwise"):
        _merge(tmp_path, "dare", method="dare", **pair)
    with pytest.raises(MicromergeError, match="zoo checkpoints are fetched through open_clip"):
        _merge(tmp_path, "zoo", **{**pair, "base": "openai-vit-b-32"})
    with pytest.raises(MicromergeError, match="hub checkpoints are fetched through open_clip"):
        _merge(tmp_path, "hub", **{**pair, "base": "hf-hub:wisdomik/QuiltNet-B-32"})
    assert not list(tmp_path.glob("bf16*")) and not list(tmp_path.glob("dare*"))


def test_merge_of_safetensors_files_never_imports_torch(tmp_path, checkpoints):
    _checkpoint(checkpoints[0], 0)
    _checkpoint(checkpoints[1], 1)
    code = (
        "import sys\nfrom micromerge.cli import merge_main\nsys.argv = ['merge'] + sys.argv[1:]\n"
        "try:\n    merge_main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('torch imported:', 'torch' in sys.modules)"
    )
    args = [
        "--base",
        checkpoints[0],
        "--ft",
        checkpoints[1],
        "--out",
        str(tmp_path / "o.safetensors"),
        "--quiet",
    ]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "torch imported: False", result.stdout + result.stderr
    assert json.loads((tmp_path / "o.safetensors.manifest.json").read_text())["engine"] == "numpy"


def test_sharded_safetensors_input_runs_on_numpy_with_the_same_bytes(tmp_path, checkpoints):
    _checkpoint(checkpoints[0], 0)
    ft = _checkpoint(checkpoints[1], 1)
    keys = sorted(ft)
    shards = {"ft-1.safetensors": keys[::2], "ft-2.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file(
            {k: ft[k] for k in shard_keys}, str(tmp_path / name), metadata={"micromerge.arch": "nano-clip"}
        )
    index = tmp_path / "ft.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    sharded = _merge(tmp_path, "sharded", base=checkpoints[0], finetuned=[str(index)], alpha=0.4)
    single = _merge(tmp_path, "single", base=checkpoints[0], finetuned=[checkpoints[1]], alpha=0.4)
    assert sharded.manifest["engine"] == "numpy"
    assert _split(sharded.path)[2] == _split(single.path)[2]


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_both_engines_refuse_nonfinite_inputs_and_write_nothing(tmp_path, checkpoints, engine):
    _checkpoint(checkpoints[0], 0)
    ft = _checkpoint(checkpoints[1], 1, torch.float16)
    ft["visual.proj"][1, 1] = float("nan")
    save_file(ft, checkpoints[1])
    pair = {"base": checkpoints[0], "finetuned": [checkpoints[1]], "engine": engine}
    with pytest.raises(MicromergeError, match="'visual.proj' contains NaN or Inf") as refused:
        _merge(tmp_path, "refused", **pair)
    assert str(refused.value).startswith(f"{checkpoints[1]}: "), "named where it is: the input"
    assert not list(tmp_path.glob("refused*"))
    with pytest.warns(UserWarning, match="merging anyway"):
        output = _merge(tmp_path, "allowed", allow_nonfinite=True, **pair)
    assert torch.isnan(load_file(str(output.path))["visual.proj"][1, 1])
    _checkpoint(checkpoints[1], 1, torch.float16)  # a finite specialist, and an Inf in the base
    base = _checkpoint(checkpoints[0], 0)
    base["token_embedding.weight"][0, 0] = float("inf")
    save_file(base, checkpoints[0], metadata={"micromerge.arch": "nano-clip"})
    for excluded in ((), ("token_embedding.weight",)):  # merged, or copied from the base as it is
        with pytest.raises(MicromergeError, match="'token_embedding.weight' contains NaN or Inf") as refused:
            _merge(tmp_path, "refused", **pair, exclude=excluded)
        assert str(refused.value).startswith(f"{checkpoints[0]}: ")


STREAMED = [m for m, method in METHODS.items() if method.statistics is None and m != "linear"]


@pytest.mark.parametrize("name", STREAMED)
def test_the_file_engine_equals_the_in_memory_merge_for_every_data_free_method(tmp_path, name):
    """The file engine reads each tensor into a buffer its source reuses, and a method's whole-model
    `prepare` reads every key before any is merged: both hold only if nothing keeps a read past the
    next one. merge_state_dicts holds every tensor in memory, so the two agree only if that is so."""
    method = METHODS[name]
    count = 1 if method.max_finetuned == 1 else 2
    paths = [str(tmp_path / f"m{seed}.safetensors") for seed in range(count + 1)]
    models = [write_checkpoint(path, seed) for seed, path in enumerate(paths)]
    job = job_from_mapping({"base": paths[0], "finetuned": paths[1:], "method": name, "alpha": 0.4,
                            "out": str(tmp_path / "o.safetensors"), "engine": "torch"})  # fmt: skip
    (output,) = run_merge_job(job, progress=False)
    written = load_file(str(output.path))
    expected = merge_state_dicts(name, models[0], models[1:], job.spec.params, strength=0.4)
    for key, tensor in expected.items():
        torch.testing.assert_close(written[key], tensor, atol=1e-6, rtol=0, msg=f"{name}: {key}")

"""What `--allow-pickle` reads out of a pickle that holds Python objects: exactly the weights a
state dict would hold, whatever era of torch or kind of wrapper wrote them.

Facts about the files, all from torch's own pickling code (torch/_tensor.py `_reduce_ex_internal`,
torch/nn/parameter.py `__reduce_ex__`, torch/nn/modules/module.py): torch 1.x modules kept
`_parameters`, `_buffers` and `_modules` in `collections.OrderedDict`s (torch 2.x uses plain
dicts); `state_dict()` returns an OrderedDict carrying a `_metadata` attribute; a Parameter with
Python attributes pickles through `_rebuild_parameter_with_state`, a tensor with attributes or of a
subclass through `_rebuild_from_type_v2`; torch before 0.4 rebuilt tensors with `_rebuild_tensor`;
`nn.DataParallel` prefixes every key with `module.`. Trainer checkpoints commonly save
`{"state_dict": ..., "args": argparse.Namespace(...)}`, which `weights_only` refuses.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle

import pytest
import torch

from micromerge.core.errors import MicromergeError
from micromerge.merging.sources import open_source


class _Reduce:
    """Pickles as `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class _Tagged(torch.Tensor):
    """A tensor subclass, as some libraries keep weights in; the class is gone when read back."""


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    model[1].running_mean.normal_()  # persistent buffers with values of their own
    model[1].running_var.uniform_(0.5, 2.0)
    model.register_buffer("causal_mask", torch.ones(2, 2), persistent=False)  # not a weight
    return model


def _as_torch_1(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        for name in ("_parameters", "_buffers", "_modules"):
            module.__dict__[name] = collections.OrderedDict(module.__dict__[name])
    return model


def _read(path, allow_pickle=True) -> dict[str, torch.Tensor]:
    with open_source(str(path), allow_pickle=allow_pickle) as source:
        return {key: source.read(key).clone() for key in source.keys()}


def _assert_same(read: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(read) == set(expected)
    for key, value in expected.items():
        assert torch.equal(read[key], value), key


@pytest.mark.parametrize("legacy_format", [False, True])
@pytest.mark.filterwarnings("error")
def test_a_torch_1_whole_module_gives_its_state_dict_buffers_included(tmp_path, legacy_format):
    model = _as_torch_1(_model())
    assert isinstance(model[1]._buffers, collections.OrderedDict)
    path = tmp_path / "module.pt"
    torch.save(model, path, _use_new_zipfile_serialization=not legacy_format)
    _assert_same(_read(path), model.state_dict())  # running stats in, the non-persistent mask out


def test_a_protocol_1_pickle_is_read(tmp_path):
    """Protocol 0/1 pickles objects through `copyreg._reconstructor` (Python 2 spelt `copy_reg`)."""
    model = _model()
    buffer = io.BytesIO()
    torch.save(model, buffer, pickle_protocol=1, _use_new_zipfile_serialization=False)
    assert b"_reconstructor" in buffer.getvalue()
    (tmp_path / "old.pt").write_bytes(buffer.getvalue())
    _assert_same(_read(tmp_path / "old.pt"), model.state_dict())


def test_a_trainer_checkpoint_with_args_gives_its_state_dict(tmp_path):
    model = _model()
    state = model.state_dict()
    assert hasattr(state, "_metadata")
    torch.save({"epoch": 3, "state_dict": state, "args": argparse.Namespace(lr=1e-5)}, tmp_path / "ckpt.pt")
    with pytest.raises(MicromergeError, match="--allow-pickle"):
        _read(tmp_path / "ckpt.pt", allow_pickle=False)
    _assert_same(_read(tmp_path / "ckpt.pt"), dict(state))


def test_a_data_parallel_module_loses_its_module_prefix(tmp_path):
    model = _model()
    torch.save(torch.nn.DataParallel(model), tmp_path / "dp.pt")
    _assert_same(_read(tmp_path / "dp.pt"), model.state_dict())


def test_wrappers_are_stripped_in_any_order(tmp_path):
    """wise-ft's ImageClassifier names the CLIP `image_encoder.model.`; a trainer module holding
    it as `self.model` (PyTorch Lightning's habit) puts `model.` in front of that."""
    model = _model()
    state = {f"model.image_encoder.model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state_dict": state, "args": argparse.Namespace()}, tmp_path / "wrapped.pt")
    _assert_same(_read(tmp_path / "wrapped.pt"), model.state_dict())


def test_parameters_and_tensors_with_attributes_or_subclasses_are_read_as_their_data(tmp_path):
    model = _model()
    model[3].weight.tag = "decayed"  # a Parameter with Python state
    model[1].running_mean.note = "ema"  # a buffer with Python state
    model[1].running_var = model[1].running_var.as_subclass(_Tagged)
    expected = {key: value.as_subclass(torch.Tensor) for key, value in model.state_dict().items()}
    data = pickle.dumps(model, protocol=2)
    assert b"_rebuild_parameter_with_state" in data and b"_rebuild_from_type_v2" in data
    torch.save(model, tmp_path / "tagged.pt")
    read = _read(tmp_path / "tagged.pt")
    _assert_same(read, expected)
    assert all(type(value) is torch.Tensor for value in read.values())


def test_tensors_held_by_plain_objects_are_named_by_their_attributes(tmp_path):
    """Objects that are no modules: public attributes are followed (private ones are caches, not
    weights), tuples by index, a list subclass and a non-dict state as the object itself, slots,
    a dict subclass by its keys (pickled as SETITEMS on the object, not as its state)."""
    w = [torch.full((2,), float(i)) for i in range(7)]
    holder = _Holder(
        pair=(w[0], w[1]),
        stack=_Stack([w[2], w[3]]),
        slotted=_Slotted(w[4]),
        packed=_Packed(w[5]),
        named=_Named(weight=w[6]),
    )
    holder._cache = torch.zeros(3)
    torch.save({"holder": holder}, tmp_path / "objects.pt")
    read = _read(tmp_path / "objects.pt")
    _assert_same(
        read,
        {
            "holder.pair.0": w[0],
            "holder.pair.1": w[1],
            "holder.stack.0": w[2],
            "holder.stack.1": w[3],
            "holder.slotted.weight": w[4],
            "holder.packed.0": w[5],
            "holder.named.weight": w[6],
        },
    )


def test_a_pre_0_4_rebuilt_tensor_is_read(tmp_path):
    """torch < 0.4 pickled tensors as `_rebuild_tensor(storage, offset, size, stride)`."""
    typed = torch.arange(6.0).untyped_storage()
    storage = torch.TypedStorage(wrap_storage=typed, dtype=torch.float32, _internal=True)
    old = _Reduce(torch._utils._rebuild_tensor, storage, 2, (2, 2), (2, 1))
    torch.save({"args": argparse.Namespace(), "old": old}, tmp_path / "old.pt")
    _assert_same(_read(tmp_path / "old.pt"), {"old": torch.arange(2.0, 6.0).view(2, 2)})


@pytest.mark.parametrize(
    ("rebuilt", "message"),
    [
        (
            _Reduce(torch._utils._rebuild_tensor_v2, "x", 0, (1,), (1,), False, collections.OrderedDict()),
            "UnpicklingError: tensor rebuilt from a str, not a storage",
        ),
        (
            _Reduce(torch._utils._rebuild_parameter, "x", False, collections.OrderedDict()),
            "UnpicklingError: parameter rebuilt from a str, not a tensor",
        ),
    ],
)
def test_a_rebuilder_fed_something_else_is_named(tmp_path, rebuilt, message):
    """The restricted reader checks what torch's rebuilders are handed; the weights_only reader
    (the file needs no pickle) fails inside torch, and is still one line naming the file."""
    torch.save({"args": argparse.Namespace(), "w": rebuilt}, tmp_path / "odd.pt")
    with pytest.raises(MicromergeError, match=f"odd.pt: not a readable torch pickle \\({message}\\)"):
        _read(tmp_path / "odd.pt")
    torch.save({"w": rebuilt}, tmp_path / "odd.pt")
    with pytest.raises(MicromergeError, match=r"odd.pt: corrupt or truncated checkpoint \(AttributeError: "):
        _read(tmp_path / "odd.pt", allow_pickle=False)


def test_a_pickle_of_objects_without_tensors_is_refused(tmp_path):
    torch.save({"args": argparse.Namespace(lr=1), "epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(MicromergeError, match="empty.pt: the pickle holds no tensors"):
        _read(tmp_path / "empty.pt")


class _Holder:
    def __init__(self, **attributes):
        self.__dict__.update(attributes)


class _Stack(list):
    pass


class _Named(dict):
    pass


class _Slotted:
    __slots__ = ("weight",)

    def __init__(self, weight):
        self.weight = weight


class _Packed:
    def __init__(self, weight):
        self.weight = weight

    def __getstate__(self):
        return (self.weight,)

    def __setstate__(self, state):
        (self.weight,) = state


def test_a_pickle_with_the_newer_dtypes_says_what_to_do(tmp_path):
    """torch pickles uint16/uint32/uint64/float8 tensors over an untyped storage
    (`_rebuild_tensor_v3`), which the restricted reader does not rebuild: said, not an
    AttributeError from inside torch."""
    torch.save({"args": argparse.Namespace(), "w": torch.ones(2, dtype=torch.uint16)}, tmp_path / "u16.pt")
    with pytest.raises(
        MicromergeError, match=r"u16.pt: .*uint16/uint32/uint64/float8 tensors.*state_dict\(\)"
    ):
        _read(tmp_path / "u16.pt")


def test_a_merge_job_built_in_python_reads_no_pickle_and_redoes_no_merge_unless_asked(tmp_path):
    """`job_from_mapping` is the API's door (the demo, a soup and an ablation entry build their jobs
    through it): a mapping that names neither `allow_pickle` nor `force` gets the CLI's defaults, so
    a trainer checkpoint holding Python objects is refused, and a finished merge is kept, not redone."""
    from micromerge.merging.job import job_from_mapping, run_merge_job

    state = _model().state_dict()
    for name, scale in (("base", 1.0), ("ft", 2.0)):
        weights = {key: value * scale if value.is_floating_point() else value for key, value in state.items()}
        torch.save({"state_dict": weights, "args": argparse.Namespace(lr=1e-5)}, tmp_path / f"{name}.pt")
    values = {"base": str(tmp_path / "base.pt"), "finetuned": [str(tmp_path / "ft.pt")], "alpha": 0.5}
    values["out"] = str(tmp_path / "merged.safetensors")
    with pytest.raises(MicromergeError, match="pass --allow-pickle"):
        run_merge_job(job_from_mapping(values), progress=False)
    assert not (tmp_path / "merged.safetensors").exists()
    (first,) = run_merge_job(job_from_mapping({**values, "allow_pickle": True}), progress=False)
    (again,) = run_merge_job(job_from_mapping({**values, "allow_pickle": True}), progress=False)
    assert not first.reused and again.reused
    (forced,) = run_merge_job(
        job_from_mapping({**values, "allow_pickle": True, "force": True}), progress=False
    )
    assert not forced.reused


def test_a_failure_without_a_message_is_still_one_line(tmp_path, monkeypatch):
    """torch's rebuilders fail with any exception, some with no message (an `assert` inside them):
    taking its first line raised IndexError, a traceback from inside micromerge's own error path.
    The type's name stands in for the message (micromerge.core.errors.first_line)."""
    from micromerge.merging import torch_sources

    def fails_without_a_message(*_args, **_kwargs):
        raise AssertionError

    torch.save({"w": torch.zeros(2)}, tmp_path / "odd.pt")
    monkeypatch.setattr(torch_sources.torch, "load", fails_without_a_message)
    with pytest.raises(
        MicromergeError, match=r"odd.pt: corrupt or truncated checkpoint \(AssertionError: AssertionError\)$"
    ):
        _read(tmp_path / "odd.pt", allow_pickle=False)

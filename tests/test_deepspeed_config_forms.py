"""The "nongns" section is read from every form in which ``deepspeed.initialize`` takes its
config (keyword or positional, ``config``/``config_params``/``args.deepspeed_config``/
``args.deepscale_config``, dict/path/JSON or hjson/base64), and from the same dict DeepSpeed
sees; a form that cannot be read is an error naming the argument, never a run without the
plugin. Also: a batch set twice, by DeepSpeed's fields and by ``initial_batch_size``, must agree.
"""

from __future__ import annotations

import argparse
import base64
import json
import os

import pytest
import torch
from torch import nn

import nongns_dist.deepspeed as nds
from nongns_dist import GNSConfig

from .distributed import spawn

deepspeed = pytest.importorskip("deepspeed")

SECTION = {"enabled": True, "norm": "l1", "interval": 3, "theta": 0.37, "adapt_batch_size": False}
CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "nongns": SECTION,
}
# DeepSpeed reads its files (and base64) with hjson: comments, unquoted keys, trailing commas
HJSON = """// the same config, in hjson
{
  train_micro_batch_size_per_gpu: 2,  # per rank
  gradient_accumulation_steps: 1,
  optimizer: {type: "AdamW", params: {lr: 0.001}},
  nongns: {enabled: true, norm: "l1", interval: 3, theta: 0.37, adapt_batch_size: false,},
}
"""


def _b64(text):
    return base64.urlsafe_b64encode(text.encode()).decode()


def _files(directory):
    json_path = os.path.join(directory, "ds.json")
    hjson_path = os.path.join(directory, "ds.hjson")
    with open(json_path, "w") as f:
        json.dump(CONFIG, f)
    with open(hjson_path, "w") as f:
        f.write(HJSON)
    return json_path, hjson_path


def _forms(directory):
    """id -> (positional args, keyword args, the value DeepSpeed reads itself or None)."""
    from pathlib import Path

    js, hj = _files(directory)
    ns = argparse.Namespace
    return {
        "dict": ((), {"config": CONFIG}, CONFIG),
        "str path": ((), {"config": js}, js),
        "Path": ((), {"config": Path(js)}, None),
        "hjson file": ((), {"config": hj}, hj),
        "JSON text": ((), {"config": json.dumps(CONFIG)}, None),
        "hjson text": ((), {"config": HJSON}, None),
        "base64 JSON": ((), {"config": _b64(json.dumps(CONFIG))}, _b64(json.dumps(CONFIG))),
        "base64 hjson": ((), {"config": _b64(HJSON)}, _b64(HJSON)),
        "config_params": ((), {"config_params": js}, js),
        "config_params Path": ((), {"config_params": Path(hj)}, None),
        "args= deepspeed_config": ((), {"args": ns(deepspeed_config=js)}, js),
        "positional args": ((ns(deepspeed_config=hj, local_rank=None),), {}, hj),
        "args.deepscale_config": ((ns(deepscale_config=js),), {}, js),
        "args dict": ((ns(deepspeed_config=CONFIG),), {}, CONFIG),
        "args base64": ((ns(deepspeed_config=_b64(HJSON)),), {}, _b64(HJSON)),
    }


FORMS = ["dict", "str path", "Path", "hjson file", "JSON text", "hjson text", "base64 JSON",
         "base64 hjson", "config_params", "config_params Path", "args= deepspeed_config",
         "positional args", "args.deepscale_config", "args dict", "args base64"]  # fmt: skip


@pytest.fixture
def forms(tmp_path):
    return _forms(str(tmp_path))


@pytest.mark.parametrize("form", FORMS)
def test_every_form_gives_the_section_deepspeed_sees(form, forms):
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    assert list(forms) == FORMS
    args, kwargs, deepspeed_reads = forms[form]
    config, _ = nds.resolve_config(*args, **kwargs)
    assert GNSConfig.from_dict(config["nongns"]) == GNSConfig(**SECTION)
    assert json.loads(json.dumps(config)) == CONFIG
    if deepspeed_reads is not None:  # DeepSpeed's own reading of the same value: equal
        assert config == load_ds_config(deepspeed_reads)


def test_old_release_reading_equals_load_ds_config(forms):
    """The fallback for DeepSpeed releases without ``load_ds_config`` reads the same dicts."""
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    for form in ("str path", "hjson file", "base64 JSON", "base64 hjson"):
        value = forms[form][1]["config"]
        assert nds._mirror_load(value) == load_ds_config(value)


def test_read_section_reads_every_config_value(forms):
    for form in ("dict", "str path", "Path", "hjson file", "JSON text", "base64 hjson"):
        assert nds.read_section(forms[form][1]["config"]) == GNSConfig(**SECTION)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"config": "no_such_config.json"}, r"config='no_such_config.json'.*no file exists"),
        ({"config_params": "no_such_config.json"}, r"^config_params='no_such"),
        ({"config": '{"train_batch_size": 2,'}, r"config=.*not JSON/hjson text \(Hjson"),
        ({"config": "[1, 2]"}, r"config=.*as JSON/hjson text it holds a list, not an object"),
        ({"config": _b64("[1, 2]")}, r"config=.*as base64 it holds a list"),
        ({"config": '{"a": 1, "a": 2}'}, r"config=.*Duplicate keys.*\['a'\]"),
        ({"config": 3}, r"config: a DeepSpeed config must be a dict, a path.*got int 3"),
        ({"config": b"{}"}, r"config: .*got bytes"),
        ({}, r"no DeepSpeed config: pass config="),
        ({"args": argparse.Namespace(deepspeed_config=None)}, r"no DeepSpeed config"),
    ],
)
def test_unreadable_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        nds.resolve_config(**kwargs)
    if kwargs:
        assert "a dict, a path (str or os.PathLike)" in str(info.value)  # what is accepted


def test_unreadable_file_and_argument_conflicts(tmp_path):
    from pathlib import Path

    dup = tmp_path / "dup.json"
    dup.write_text('{"nongns": {}, "nongns": {"enabled": true}}')
    with pytest.raises(ValueError, match=r"config=.*dup.json.*Duplicate keys.*nongns"):
        nds.resolve_config(config=str(dup))
    with pytest.raises(ValueError, match=r"config=.*missing.json'.*no file exists"):
        nds.resolve_config(config=Path(tmp_path / "missing.json"))
    path = str(tmp_path / "ds.json")
    Path(path).write_text(json.dumps(CONFIG))
    ns = argparse.Namespace
    with pytest.raises(ValueError, match=r"args.deepscale_config and args.deepspeed_config"):
        nds.resolve_config(ns(deepspeed_config=path, deepscale_config=path))
    with pytest.raises(ValueError, match=r"args.deepspeed_config and config= are both set"):
        nds.resolve_config(ns(deepspeed_config=path), config=CONFIG)
    # forms DeepSpeed refuses in args (it reads that field itself): named, with what it takes
    for value in (Path(path), json.dumps(CONFIG)):
        with pytest.raises(ValueError, match=r"^args.deepspeed_config.*reads this field itself"):
            nds.resolve_config(ns(deepspeed_config=value))
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    with pytest.raises(ValueError, match=r"^config=.*bad.json'.*holds a list; a DeepSpeed"):
        nds.resolve_config(config=bad)
    # and through initialize: refused before DeepSpeed starts (no process group here)
    with pytest.raises(ValueError, match=r"^config_params="):
        nds.initialize(model=nn.Linear(2, 2), config_params="{nongns: ")


# -- real engines (gloo, CPU, 2 processes) --------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _attach_every_form(rank, world, directory):
    seen = {}
    for form, (args, kwargs, _) in _forms(directory).items():
        model = _model()
        if args:  # all positional: (args, model, optimizer, model_parameters)
            engine, *_ = nds.initialize(*args, model, None, model.parameters(), **kwargs)
        else:
            engine, *_ = nds.initialize(model=model, model_parameters=model.parameters(), **kwargs)
        plugin = getattr(engine, "nongns", None)
        x = torch.randn(2, 8)
        engine.backward(engine(x).pow(2).mean())
        engine.step()
        seen[form] = None if plugin is None else (plugin.config, plugin.samples)
    return seen


@pytest.mark.distributed
def test_plugin_attaches_from_every_form(tmp_path, deepspeed_ops):
    seen = spawn(_attach_every_form, 2, str(tmp_path))[0]
    assert set(seen) == set(FORMS)
    for form, got in seen.items():
        assert got == (GNSConfig(**SECTION), 2 * 2), form


def _batch_set_twice(rank, world):
    def start(initial, **batch):
        section = {"enabled": True, "norm": "l1", "initial_batch_size": initial}
        optimizer = {"type": "AdamW", "params": {"lr": 1e-3}}
        config = {"train_micro_batch_size_per_gpu": 2, **batch, "optimizer": optimizer,
                  "nongns": section}  # fmt: skip
        model = _model()
        try:
            engine, *_ = nds.initialize(model=model, model_parameters=model.parameters(),
                                        config=config)  # fmt: skip
        except ValueError as exc:
            return str(exc)
        return engine.nongns.batch_size, engine.gradient_accumulation_steps()

    return {
        "accumulation contradicts": start(16, gradient_accumulation_steps=2),
        "train_batch_size contradicts": start(16, train_batch_size=8),
        "accumulation agrees": start(16, gradient_accumulation_steps=4),
        "train_batch_size agrees": start(16, train_batch_size=16),
        "only the micro batch": start(16),  # DeepSpeed's default count: initial_batch_size rules
    }


@pytest.mark.distributed
def test_initial_batch_size_contradicting_deepspeed_batch_is_refused(deepspeed_ops):
    got = spawn(_batch_set_twice, 2)[0]
    err = got["accumulation contradicts"]
    assert isinstance(err, str), err
    assert "gradient_accumulation_steps=2" in err and "a batch of 8" in err
    assert '"initial_batch_size": 16' in err
    err = got["train_batch_size contradicts"]
    assert isinstance(err, str), err
    assert "train_batch_size=8" in err and '"initial_batch_size": 16' in err
    assert got["accumulation agrees"] == (16, 4)
    assert got["train_batch_size agrees"] == (16, 4)
    assert got["only the micro batch"] == (16, 4)

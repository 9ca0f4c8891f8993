"""``nongns_dist.deepspeed.initialize``: ``deepspeed.initialize`` plus adaptive batch sizes,
switched on from the JSON config.

    {
      "train_micro_batch_size_per_gpu": 8,
      "gradient_accumulation_steps": 1,
      "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
      "zero_optimization": {"stage": 2},
      "nongns": {"enabled": true, "norm": "auto", "interval": 100, "theta": 0.6}
    }

    engine, optimizer, dataloader, scheduler = nongns_dist.deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config="ds_config.json")
    engine.nongns.last_estimate, engine.nongns.batch_size    # the plugin, when enabled

DeepSpeed ignores unknown top-level keys, so the "nongns" section rides along in the same file;
it is validated by ``GNSConfig.from_dict`` before DeepSpeed starts (a bad key or value is a
``ValueError`` naming it). Without the section, or with ``"enabled": false``, DeepSpeed's objects
come back untouched.

The config is found wherever ``deepspeed.initialize`` finds it (``config``, the deprecated
``config_params``, ``args.deepspeed_config``, the deprecated ``args.deepscale_config``; keyword or
positional) and read the way DeepSpeed reads it (a dict, a JSON/hjson file, base64-encoded
JSON/hjson), so the section read is the one in the dict DeepSpeed uses. ``config``/
``config_params`` also take an ``os.PathLike`` or JSON/hjson text, which DeepSpeed itself
refuses; whatever the form, DeepSpeed is handed the dict read here (``args`` is left as
given: DeepSpeed reads it with the same loader). A value that cannot be read is a
``ValueError`` naming the argument, never a run without the plugin.

DeepSpeed unpickles its checkpoint files with ``torch.load(weights_only=False)``: a crafted file
runs code when loaded. ``check_checkpoint`` opens them first with ``weights_only=True``; the
plugin's ``engine.load_checkpoint`` calls it before DeepSpeed's own load.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch

from nongns_dist.config import GNSConfig

__all__ = [
    "SAFE_GLOBALS",
    "UnsafeCheckpointError",
    "check_checkpoint",
    "initialize",
    "load_config",
    "read_section",
    "resolve_config",
]

SECTION = "nongns"

ACCEPTED = (
    "a dict, a path (str or os.PathLike) to a JSON/hjson file, JSON/hjson text, or "
    "base64-encoded JSON/hjson"
)
#: What DeepSpeed itself reads from ``args.deepspeed_config`` (the plugin leaves ``args`` alone).
ACCEPTED_IN_ARGS = (
    "a dict, a str path to a JSON/hjson file, or base64-encoded JSON/hjson (DeepSpeed reads "
    "this field itself; pass other forms as config=)"
)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _hjson() -> Any:
    """DeepSpeed's config parser (a dependency of DeepSpeed; JSON plus comments, unquoted keys
    and trailing commas). Imported by name: it ships no type hints."""
    return importlib.import_module("hjson")


def _deepspeed_load(config: str) -> Any:
    """DeepSpeed's own reading of a str config (an existing file, else base64), so the dict is
    the one DeepSpeed makes: ``load_ds_config`` (0.17+, what ``deepspeed.initialize`` calls),
    else the same two steps ``DeepSpeedConfig`` runs in older releases."""
    try:
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config
    except ImportError:
        load_ds_config = None
    if load_ds_config is not None:
        return load_ds_config(config)
    return _mirror_load(config)


def _mirror_load(config: str) -> Any:
    """``DeepSpeedConfig.__init__``'s reading of a str (DeepSpeed 0.16-0.19)."""
    import base64

    from deepspeed.runtime.config_utils import dict_raise_error_on_duplicate_keys

    if os.path.exists(config):
        with open(config) as f:
            return _hjson().load(f, object_pairs_hook=dict_raise_error_on_duplicate_keys)
    return _hjson().loads(base64.urlsafe_b64decode(config).decode("utf-8"))


def _parse_text(text: str) -> Any:
    """JSON/hjson text, read as DeepSpeed reads its files (duplicate keys refused)."""
    from deepspeed.runtime.config_utils import dict_raise_error_on_duplicate_keys

    return _hjson().loads(text, object_pairs_hook=dict_raise_error_on_duplicate_keys)


def _reason(exc: BaseException) -> str:
    """The cause DeepSpeed wrapped (its own message repeats the whole value)."""
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"


def load_config(
    config: Any, argument: str = "config", *, deepspeed_forms_only: bool = False
) -> dict[str, Any]:
    """The dict a DeepSpeed config value stands for; ``argument`` names it in the errors.

    What DeepSpeed reads is read by DeepSpeed's own loader, in its order: a dict as is; a str
    naming an existing file (hjson, duplicate keys refused); else base64 of JSON/hjson. Beyond
    that (not with ``deepspeed_forms_only``, for the fields DeepSpeed reads itself): another
    Mapping, an ``os.PathLike`` path, and JSON/hjson text when the str is not base64."""
    if isinstance(config, dict):
        return config
    accepted = ACCEPTED_IN_ARGS if deepspeed_forms_only else ACCEPTED
    if not deepspeed_forms_only:
        if isinstance(config, Mapping):
            return dict(config)
        if isinstance(config, os.PathLike):
            config = os.fspath(config)
    if not isinstance(config, str):
        raise ValueError(
            f"{argument}: a DeepSpeed config must be {accepted}; got {type(config).__name__} "
            f"{_short(config)}"
        )
    shown = f"{argument}={_short(config)}"
    if os.path.exists(config):
        try:
            result = _deepspeed_load(config)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{shown}: cannot read the file ({_reason(exc)}); a DeepSpeed config file holds "
                "one JSON/hjson object"
            ) from exc
        if not isinstance(result, dict):
            raise ValueError(
                f"{shown}: the file holds a {type(result).__name__}; a DeepSpeed config file "
                "holds one JSON/hjson object"
            )
        return result
    tried = ["no file exists at that path"]
    try:
        result = _deepspeed_load(config)  # base64, decoded as DeepSpeed decodes it
    except (ValueError, UnicodeDecodeError) as exc:
        tried.append(f"not base64 of JSON/hjson ({_reason(exc)})")
    else:
        if isinstance(result, dict):
            return result
        tried.append(f"as base64 it holds a {type(result).__name__}, not an object")
    if not deepspeed_forms_only:
        try:
            result = _parse_text(config)
        except ValueError as exc:
            tried.append(f"not JSON/hjson text ({_reason(exc)})")
        else:
            if isinstance(result, dict):
                return result
            tried.append(f"as JSON/hjson text it holds a {type(result).__name__}, not an object")
    raise ValueError(f"{shown}: {'; '.join(tried)}; a DeepSpeed config must be {accepted}")


def resolve_config(*args: Any, **kwargs: Any) -> tuple[dict[str, Any], str]:
    """Find the config among ``deepspeed.initialize``'s arguments as it does: ``config``, else
    ``config_params``, else ``args.deepscale_config`` / ``args.deepspeed_config`` (keyword or
    positional, bound to its real signature). Returns the dict and the argument's name. The
    conflicts DeepSpeed asserts on are ``ValueError`` here, before it starts."""
    import deepspeed

    bound = inspect.signature(deepspeed.initialize).bind(*args, **kwargs)
    given = bound.arguments
    name, value = "config", given.get("config")
    if value is None and given.get("config_params") is not None:
        name, value = "config_params", given["config_params"]
    cli = given.get("args")
    from_args = None
    if getattr(cli, "deepscale_config", None) is not None:
        if getattr(cli, "deepspeed_config", None) is not None:
            raise ValueError(
                "args.deepscale_config and args.deepspeed_config are both set; DeepSpeed takes "
                "one (deepscale_config is the deprecated name): set only args.deepspeed_config"
            )
        from_args = "args.deepscale_config"
    elif getattr(cli, "deepspeed_config", None) is not None:
        from_args = "args.deepspeed_config"
    if from_args is not None:
        if value is not None:
            raise ValueError(
                f"{from_args} and {name}= are both set; DeepSpeed takes the config from one "
                "place: drop one of them"
            )
        name, value = from_args, getattr(cli, from_args.split(".")[1])
        # DeepSpeed reads this field itself: only its own forms (others go in config=)
        return load_config(value, name, deepspeed_forms_only=True), name
    if value is None:
        raise ValueError(
            "no DeepSpeed config: pass config= (or the deprecated config_params=), or an args "
            f"with deepspeed_config set; a DeepSpeed config must be {ACCEPTED}"
        )
    return load_config(value, name), name


def read_section(config: Any, argument: str = "config") -> GNSConfig | None:
    """The validated "nongns" section of a DeepSpeed config in any form ``load_config`` reads,
    or None (no config, or no section)."""
    if config is None:
        return None
    section = load_config(config, argument).get(SECTION)
    return None if section is None else GNSConfig.from_dict(section)


#: Batch fields of the user's config that fix DeepSpeed's global batch.
BATCH_FIELDS = ("train_batch_size", "gradient_accumulation_steps")


def _check_batch(explicit: dict[str, Any], gns: GNSConfig, engine: Any) -> None:
    """Refuse a ``nongns.initial_batch_size`` that contradicts a batch the user's DeepSpeed
    config set explicitly (the plugin would otherwise override it without a word). Decided from
    the user's dict, since DeepSpeed fills in defaults; the batch they give is the engine's
    ``train_batch_size`` (DeepSpeed checks micro x ranks x accumulation against it)."""
    if not explicit or gns.initial_batch_size is None:
        return
    batch = int(engine.train_batch_size())
    if batch == gns.initial_batch_size:
        return
    given = ", ".join(f"{k}={v}" for k, v in explicit.items())
    raise ValueError(
        f"the DeepSpeed config sets {given}, a batch of {batch} (micro batch "
        f"{engine.train_micro_batch_size_per_gpu()} x {engine.dp_world_size} data-parallel "
        f"ranks x {engine.gradient_accumulation_steps()} accumulation steps), but "
        f'"nongns": {{"initial_batch_size": {gns.initial_batch_size}}} asks for another; '
        "set the batch in one place (drop one of them) or make them agree"
    )


def initialize(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """Same arguments and 4-tuple as ``deepspeed.initialize``; the engine gets ``.nongns``."""
    import deepspeed

    from nongns_dist.engines.deepspeed import install

    config, name = resolve_config(*args, **kwargs)
    section = config.get(SECTION)
    gns = None if section is None else GNSConfig.from_dict(section)  # before DeepSpeed starts
    explicit = {k: config[k] for k in BATCH_FIELDS if config.get(k) is not None}
    if name in ("config", "config_params"):
        # DeepSpeed gets the dict read here: the one the section came from, whatever the form
        # (args is left as given: DeepSpeed reads it with the same loader)
        bound = inspect.signature(deepspeed.initialize).bind(*args, **kwargs)
        bound.arguments.pop("config_params", None)
        bound.arguments["config"] = config
        args, kwargs = bound.args, bound.kwargs
    result = deepspeed.initialize(*args, **kwargs)
    if gns is not None and gns.enabled:
        engine = result[0]
        _check_batch(explicit, gns, engine)
        install(engine, gns)
    return result


# -- checkpoints ----------------------------------------------------------------------------------

#: The classes beyond torch's weights-only defaults that DeepSpeed pickles into its checkpoint
#: files: found by saving real checkpoints (DeepSpeed 0.19.8, ZeRO 0-3, fp32 and bf16) and
#: asking ``torch.serialization.get_unsafe_globals_in_checkpoint``; ``DynamicLossScaler`` is the
#: fp16 form of the ``loss_scaler`` entry (``CreateLossScaler``). Plain data holders: the
#: weights-only unpickler rebuilds them from their fields (or calls the int enum / dataclass /
#: scaler constructor with numbers) and runs no other code.
SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file that ``torch.load(weights_only=True)`` refuses: DeepSpeed's own
    unrestricted load of it could run code, so it is not handed to DeepSpeed."""


def _safe_globals(extra: tuple[Any, ...]) -> list[Any]:
    found = list(extra)
    for name in SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed release: a file holding it is refused, by name
    return found


def _checkpoint_files(tag_dir: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(tag_dir):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".pt")]
    return files


def check_checkpoint(
    load_dir: str | os.PathLike[str],
    tag: Any = None,
    *,
    universal: bool = False,
    safe_globals: tuple[Any, ...] = (),
) -> list[str]:
    """Open every ``.pt`` file of a DeepSpeed checkpoint with ``weights_only=True`` before
    DeepSpeed unpickles them freely; raise ``UnsafeCheckpointError`` naming the first file
    refused (its pickle's code is not run). Returns the files checked.

    The tag resolves as ``engine.load_checkpoint`` resolves it: ``tag=None`` reads the
    ``latest`` file (``latest_universal`` when ``universal``); with no such file, or no such
    tag directory, DeepSpeed loads nothing and nothing is checked. All files of the tag are
    checked, sub-folders too (a universal checkpoint's, expert files): ZeRO reads other ranks'
    partitions when the world size changed. ``mmap=True`` leaves the tensor data unread.
    ``safe_globals``: more classes to allow, for a client_state holding the user's own (or
    ``torch.serialization.add_safe_globals``, which this honours)."""
    load_dir = os.fspath(load_dir)
    if tag is None:
        latest = os.path.join(load_dir, "latest_universal" if universal else "latest")
        if not os.path.isfile(latest):
            return []
        with open(latest) as f:
            tag = f.read().strip()
    tag_dir = os.path.join(load_dir, str(tag))
    if not os.path.isdir(tag_dir):
        return []
    files = _checkpoint_files(tag_dir)
    with torch.serialization.safe_globals(_safe_globals(tuple(safe_globals))):
        for file in files:
            _check_file(file)
    return files


def _check_file(file: str) -> None:
    try:
        try:
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # not torch's zip format (a legacy or raw pickle): the restricted unpickler still
            # applies, only without mmap
            torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever the reason, a file not read safely is not handed on
        raise UnsafeCheckpointError(
            f"{file}: refused, it does not load with torch.load(weights_only=True) and "
            f"DeepSpeed would unpickle it without restriction (a crafted file runs code "
            f"there): {type(exc).__name__}: {exc}. If the file is yours and holds a class of "
            "yours, allow it with torch.serialization.add_safe_globals"
        ) from exc

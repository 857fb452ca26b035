"""Are the pretrained weights a config asks for there? Checked on the driver before any Ray worker starts.

A model with ``pretrained: true`` (:class:`raykd.config.ModelConfig`) starts from its published
ImageNet weights: from ``pretrained_file`` when given, else from timm's hub. :func:`check_weights`
makes sure one of them works now, so that a cluster without the hub fails in a second with the
fix instead of training from random weights or failing on every worker:

- a local file must exist and read as safetensors (header only) or as a torch state dict with
  ``weights_only=True`` (nothing is ever unpickled);
- hub weights resolve through timm's own ``pretrained_cfg`` (tag, ``hf_hub_id``, ``url``, overlays)
  and count as reachable when they are in the local Hugging Face (or torch hub) cache, or when the
  hub answers a metadata request within a short timeout. ``HF_HUB_OFFLINE`` means not reachable.

The fused teacher's backbones are checked one by one (``kwargs.backbone_files.<key>`` gives one a file).
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import raykd.models  # noqa: F401 (registers raykd_* names)
from raykd.models.fused_teacher import backbone_weights
from raykd.typed import ConfigError

if TYPE_CHECKING:  # annotations only: the models do not depend on the run config
    from raykd.config import ModelConfig

__all__ = ["HUB_TIMEOUT_S", "check_file", "check_run_weights", "check_weights",
           "hub_source"]

#: Seconds a hub reachability request may take.
HUB_TIMEOUT_S = 5.0

_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class HubSource:
    """Where timm loads a model's pretrained weights from."""

    kind: str  # "hf-hub" | "url" | "file" | "" (none published)
    location: str  # hub repo id, URL or path
    revision: str | None = None
    filenames: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "hf-hub":
            rev = f"@{self.revision}" if self.revision else ""
            return f"hf-hub {self.location}{rev} ({', '.join(self.filenames)})"
        return f"{self.kind} {self.location}"


def hub_source(name: str, kwargs: dict | None = None) -> HubSource:
    """Where ``timm.create_model(name, pretrained=True, **kwargs)`` would load weights from."""
    import timm  # lazy: timm is heavy
    from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
    from timm.models._registry import split_model_name_tag

    kwargs = dict(kwargs or {})
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise ValueError(f"unknown model name {name!r}")
    cfg = resolve_pretrained_cfg(arch, pretrained_cfg=kwargs.get("pretrained_cfg") or tag or None,
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    if load_from == "hf-hub":
        filename = None
        if isinstance(loc, tuple):
            loc, filename = loc
        repo, _, revision = str(loc).partition("@")
        if filename is None:  # timm: model.safetensors first, then pytorch_model.bin
            files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
        elif filename.endswith(".safetensors"):
            files = (filename,)
        else:
            files = (str(Path(filename).with_suffix(".safetensors")), filename)
        return HubSource("hf-hub", repo, revision or None, files)
    if load_from in ("url", "file", "local-dir"):
        return HubSource("file" if load_from == "local-dir" else load_from, str(loc))
    return HubSource("", "")


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().upper() in _TRUE
    from huggingface_hub import constants  # lazy: huggingface_hub is optional here

    return bool(constants.HF_HUB_OFFLINE)


def _hf_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants  # lazy: huggingface_hub is optional here

    return constants.HF_HUB_CACHE


def _hub_problem(src: HubSource, timeout: float) -> str | None:
    """None when the weights of ``src`` can be loaded now, else why not."""
    if src.kind == "":
        return "the model has no published weights (no hf_hub_id or url in its pretrained_cfg)"
    if src.kind == "file":
        return check_file(src.location)
    if src.kind == "hf-hub":
        from huggingface_hub import try_to_load_from_cache  # lazy: huggingface_hub is optional here

        cache = _hf_cache_dir()
        for f in src.filenames:
            hit = try_to_load_from_cache(src.location, f, cache_dir=cache, revision=src.revision)
            if isinstance(hit, str) and os.path.isfile(hit):
                return None
        if _offline():
            return f"HF_HUB_OFFLINE is set and the weights are not in the cache {cache}"
        from huggingface_hub import get_hf_file_metadata, hf_hub_url  # lazy: huggingface_hub is optional here
        from huggingface_hub.errors import EntryNotFoundError

        reasons = []
        for f in src.filenames:
            try:
                get_hf_file_metadata(hf_hub_url(src.location, f, revision=src.revision), timeout=timeout)
                return None
            except EntryNotFoundError:
                reasons.append(f"{f}: not in the repository")
            except Exception as e:  # noqa: BLE001  (any network or hub error: not reachable)
                reasons.append(f"{f}: {_first_line(e)}")
        return "the hub did not answer: " + "; ".join(reasons)
    # url: torch.hub's cache, else a HEAD request
    import torch.hub  # lazy: torch is heavy

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(src.location).path).name
    if cached.is_file():
        return None
    if _offline():
        return f"HF_HUB_OFFLINE is set and the file is not in the cache {cached.parent}"
    try:
        request = urllib.request.Request(src.location, method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout) as r:
            if r.status < 400:
                return None
            return f"HTTP {r.status}"
    except Exception as e:  # noqa: BLE001
        return f"not reachable: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def check_file(path: str | Path) -> str | None:
    """None when ``path`` reads as weights (safetensors header, or a torch state dict loaded with
    ``weights_only=True`` and memory-mapped where the format allows), else why not."""
    p = Path(path).expanduser()
    if not p.is_file():
        return "the file does not exist" if not p.exists() else "not a file"
    if not os.access(p, os.R_OK):
        return "the file is not readable"
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open  # lazy: safetensors is heavy

            with safe_open(str(p), framework="pt") as f:
                if not list(f.keys()):
                    return "the safetensors file holds no tensors"
            return None
        import torch  # lazy: torch is heavy

        try:
            sd: Any = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any read error is reported)
        return f"cannot be read as safetensors or a weights_only torch state dict: {_first_line(e)}"
    import torch  # lazy: torch is heavy

    for key in ("state_dict", "model", "model_state_dict", "student"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    tensors = isinstance(sd, Mapping) and sd and all(isinstance(v, torch.Tensor) for v in sd.values())
    if not tensors:
        return "the file holds no state dict of tensors"
    return None


@dataclass(frozen=True)
class _Source:
    what: str  # e.g. "resnet50" or "raykd_fused_teacher backbone vit (vit_base_patch16_224)"
    timm_name: str
    key: str  # config key of a file, relative to the model
    file: str | None
    hub: HubSource | None


def _sources(cfg: ModelConfig) -> list[_Source]:
    """Every weight source building ``cfg`` loads (files always, the hub when ``pretrained``)."""
    if cfg.checkpoint or cfg.cut_blocks:  # a trained raykd model / blocks of the teacher: no ImageNet weights
        return []
    out: list[_Source] = []
    hub = cfg.pretrained and not cfg.pretrained_file  # a given file replaces the hub
    if cfg.pretrained_file:
        out.append(_Source(cfg.name, cfg.name, "pretrained_file", cfg.pretrained_file, None))
    members = backbone_weights(cfg.name, cfg.kwargs, hub)
    if members is not None:
        for key, m in members.items():
            what, fkey = f"{cfg.name} backbone {key} ({m['name']})", f"kwargs.backbone_files.{key}"
            if m["file"]:
                out.append(_Source(what, m["name"], fkey, str(m["file"]), None))
            elif m["hub"]:
                out.append(_Source(what, m["name"], fkey, None, hub_source(m["name"], m["kwargs"])))
    elif hub:
        out.append(_Source(cfg.name, cfg.name, "pretrained_file", None, hub_source(cfg.name, cfg.kwargs)))
    return out


def check_weights(model_cfg: ModelConfig | None, role: str, *, where: str | None = None,
                  settable: bool = True, timeout: float = HUB_TIMEOUT_S) -> None:
    """Raise :class:`ConfigError` unless every weight source of ``model_cfg`` can be loaded now.

    Args:
        model_cfg: the model (``None``: nothing to check).
        role: its config key (``student``, ``teacher``, ``teachers.resnet50.model``); errors name
            ``<role>.pretrained_file`` (or the backbone's file key) as the fix.
        where: the config file, prefixed to the message.
        settable: the key can be given with ``--set`` (false for entries of a YAML list).
        timeout: seconds for each hub request.
    """
    if model_cfg is None:
        return
    pre = f"{where}: " if where else ""
    if "pretrained" in model_cfg.kwargs:
        raise ConfigError(f"{pre}{role}.kwargs.pretrained: ask for the published weights with "
                          f"{role}.pretrained: true (a local file: {role}.pretrained_file)")
    try:
        sources = _sources(model_cfg)
    except (ValueError, RuntimeError):  # an unknown name or tag: the model build reports it with its fix
        return
    problems = []
    for s in sources:
        key = f"{role}.{s.key}"
        example = f"/path/{s.timm_name.split('.', 1)[0]}.safetensors"
        how = f"--set {key}={example}" if settable else f"{key}: {example} in {where or 'the config'}"
        if s.file is not None:
            why = check_file(s.file)
            if why:
                problems.append(f"{s.what}: weights file {s.file} ({key}): {why}. Give a readable "
                                f"safetensors file or torch state dict: {how}")
        elif s.hub is not None:
            why = _hub_problem(s.hub, timeout)
            if why:
                problems.append(
                    f"{s.what} asks for ImageNet weights ({role}.pretrained: true) from "
                    f"{s.hub.describe()}, which cannot be loaded here: {why}. Give a local file "
                    f"(safetensors or a torch state dict, e.g. saved from timm.create_model("
                    f"{s.timm_name!r}, pretrained=True) where the hub is reachable): {how}"
                )
    if problems:
        raise ConfigError(f"{pre}{role}: " + "\n  ".join(problems))


def check_run_weights(cfg: Any) -> None:
    """:func:`check_weights` for a :class:`~raykd.config.RunConfig`'s student and teacher."""
    check_weights(cfg.student, "student")
    check_weights(cfg.teacher, "teacher")

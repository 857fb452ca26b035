"""Pretrained weights: the paper configs ask for them, a missing source fails before Ray starts with
the fix, and a local file is really loaded. No test touches the network: the hub is forced offline
and the caches point at empty folders."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import raykd.models  # noqa: F401  (registers raykd models with timm)
from raykd.config import ConfigError, ModelConfig, RunConfig, load_config
from raykd.models.fused_teacher import backbone_weights
from raykd.models.weights import check_file, check_run_weights, check_weights, hub_source
from raykd.train.build import build_network
from raykd.tune.space_file import load_space

ROOT = Path(__file__).resolve().parents[2]
PAPER_CONFIGS = ["vit_teacher", "resnet50_teacher", "fused_teacher", "skindistilvit",
                 "ssdkd_resnet50_mobilenetv2", "hierattn_s", "fused_teacher_tiny_cnn"]
PAPER_SPACES = ["skindistilvit", "ssdkd", "hierattn", "fusion"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub, and empty Hugging Face and torch hub caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def _safetensors(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# --------------------------------------------------------------------------------------------------
# Missing weights fail before Ray starts, naming the model, the source and the key that gives a file
# --------------------------------------------------------------------------------------------------


def test_hub_weights_offline_without_a_file_name_the_model_the_hub_id_and_the_file_key():
    cfg = ModelConfig(name="resnet50.tv_in1k", pretrained=True)
    with pytest.raises(ConfigError) as e:
        check_weights(cfg, "teacher")
    msg = str(e.value)
    assert "resnet50.tv_in1k" in msg  # the model
    assert "timm/resnet50.tv_in1k" in msg and "HF_HUB_OFFLINE" in msg  # the source tried and why not
    assert "--set teacher.pretrained_file=/path/resnet50.safetensors" in msg  # the fix


def test_a_run_config_asking_for_hub_weights_offline_fails_in_prepare_before_any_data_or_worker(tmp_path):
    from raykd.train.driver import prepare

    cfg = load_config(RunConfig, ROOT / "configs" / "resnet50_teacher.yaml",
                      [f"data.path={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=r"student\.pretrained_file"):
        prepare(cfg)
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_a_paper_space_asking_for_hub_weights_offline_fails_before_the_fit_check(tmp_path):
    from raykd.tune.plan import check_combinations

    space = load_space(ROOT / "search_spaces" / "ssdkd.yaml",
                       [f"output_dir={tmp_path}", f"base.data.path={tmp_path / 'data'}"])
    with pytest.raises(ConfigError) as e:
        check_combinations(space)
    msg = str(e.value)
    assert "ssdkd.yaml" in msg and "resnet50.tv_in1k" in msg and "timm/resnet50.tv_in1k" in msg
    assert "--set teachers.resnet50.model.pretrained_file=" in msg
    assert not (tmp_path / "data").exists()


def test_a_space_student_asking_for_hub_weights_names_its_list_entry(tmp_path):
    from raykd.tune.plan import check_space_weights

    teacher_file = _safetensors(timm.create_model("test_resnet"), tmp_path / "teacher.safetensors")
    space = load_space(ROOT / "search_spaces" / "ssdkd.yaml",
                       [f"teachers.resnet50.model.pretrained_file={teacher_file}"])
    with pytest.raises(ConfigError) as e:
        check_space_weights(space)
    msg = str(e.value)
    assert "mobilenetv2_100" in msg and "timm/mobilenetv2_100" in msg
    assert "students[0].pretrained_file" in msg and "teachers.resnet50" not in msg


def test_every_backbone_of_the_fused_teacher_without_a_file_is_named_with_its_own_key(tmp_path):
    files = {k: str(_safetensors(timm.create_model(n, num_classes=0), tmp_path / f"{k}.safetensors"))
             for k, n in (("cnn_a", "test_resnet"), ("cnn_b", "test_convnext"))}
    cfg = ModelConfig(name="raykd_test_fused_teacher", pretrained=True, kwargs={"backbone_files": files})
    with pytest.raises(ConfigError) as e:
        check_weights(cfg, "student")
    msg = str(e.value)
    assert "backbone vit (test_vit)" in msg and "timm/test_vit" in msg
    assert "--set student.kwargs.backbone_files.vit=" in msg
    assert "cnn_a" not in msg and "cnn_b" not in msg


def test_a_url_only_source_is_named_and_counts_when_in_the_torch_hub_cache(tmp_path):
    url = "https://example.invalid/weights/resnet_w.pth"
    cfg = ModelConfig(name="test_resnet", pretrained=True,
                      kwargs={"pretrained_cfg_overlay": {"hf_hub_id": None, "url": url}})
    with pytest.raises(ConfigError, match=r"url https://example\.invalid/weights/resnet_w\.pth"):
        check_weights(cfg, "student")
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet_w.pth"
    cached.parent.mkdir(parents=True)
    torch.save(timm.create_model("test_resnet").state_dict(), cached)
    check_weights(cfg, "student")


def test_hub_weights_in_the_local_cache_count_as_reachable_offline(tmp_path):
    snap = tmp_path / "hf-cache" / "models--timm--test_resnet.r160_in1k"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    (snap / "snapshots" / ("0" * 40)).mkdir(parents=True)
    _safetensors(timm.create_model("test_resnet"), snap / "snapshots" / ("0" * 40) / "model.safetensors")
    assert hub_source("test_resnet").location == "timm/test_resnet.r160_in1k"
    check_weights(ModelConfig(name="test_resnet", pretrained=True), "student")


def test_online_the_hub_is_asked_with_a_short_timeout(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    asked = []

    def answers(url, timeout=None, **kw):
        asked.append((url, timeout))

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", answers)
    check_weights(ModelConfig(name="test_resnet", pretrained=True), "student", timeout=2.0)
    assert asked and "timm/test_resnet.r160_in1k" in asked[0][0] and asked[0][1] == 2.0

    def unreachable(url, timeout=None, **kw):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    with pytest.raises(ConfigError, match="no route to host") as e:
        check_weights(ModelConfig(name="test_resnet", pretrained=True), "student")
    assert "--set student.pretrained_file=" in str(e.value)


def test_a_model_without_published_weights_cannot_ask_for_them():
    with pytest.raises(ConfigError, match="no published weights") as e:
        check_weights(ModelConfig(name="raykd_hierattn_s", pretrained=True), "student")
    assert "student.pretrained_file" in str(e.value)


def test_pretrained_in_kwargs_points_to_the_field():
    with pytest.raises(ConfigError, match=r"student\.kwargs\.pretrained.*student\.pretrained: true"):
        check_weights(ModelConfig(name="test_resnet", kwargs={"pretrained": True}), "student")


def test_a_missing_or_unreadable_file_is_named_with_its_key(tmp_path):
    missing = r"missing\.safetensors.*does not exist.*--set teacher\.pretrained_file="
    with pytest.raises(ConfigError, match=missing):
        check_weights(ModelConfig(name="test_resnet", pretrained=True,
                                  pretrained_file=str(tmp_path / "missing.safetensors")), "teacher")
    junk = tmp_path / "junk.pt"
    torch.save({"epoch": 3}, junk)
    with pytest.raises(ConfigError, match="no state dict of tensors"):
        check_weights(ModelConfig(name="test_resnet", pretrained_file=str(junk)), "student")


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickled_object_is_refused_without_being_unpickled(tmp_path):
    _Payload.marker = str(tmp_path / "executed")
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": _Payload()}))
    assert "weights_only" in check_file(path)
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"w": _Payload()}, zipped)  # torch's zip format, same payload
    assert "weights_only" in check_file(zipped)
    assert not (tmp_path / "executed").exists()


# --------------------------------------------------------------------------------------------------
# A local file is checked and really loaded
# --------------------------------------------------------------------------------------------------


def test_a_local_file_passes_offline_and_its_weights_are_loaded(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=1000)
    path = _safetensors(src, tmp_path / "test_resnet.safetensors")
    cfg = ModelConfig(name="test_resnet", pretrained=True, pretrained_file=str(path))
    check_weights(cfg, "student")
    torch.manual_seed(1)
    model = build_network(cfg, num_classes=8)  # the training run's own builder
    assert torch.equal(model.conv1[0].weight, src.conv1[0].weight)
    assert torch.equal(model.layer4[0].conv1.weight, src.layer4[0].conv1.weight)
    assert model.fc.out_features == 8  # the 1000-class head is left out


def test_a_run_config_given_a_file_with_set_passes_the_driver_check(tmp_path):
    path = _safetensors(timm.create_model("test_resnet"), tmp_path / "weights.safetensors")  # readable
    cfg = load_config(RunConfig, ROOT / "configs" / "resnet50_teacher.yaml",
                      [f"student.pretrained_file={path}"])
    assert cfg.student.pretrained and cfg.student.pretrained_file == str(path)
    check_run_weights(cfg)


def test_the_fused_teacher_loads_a_file_per_backbone(tmp_path):
    torch.manual_seed(0)
    srcs = {"cnn_a": timm.create_model("test_resnet", num_classes=0),
            "cnn_b": timm.create_model("test_convnext", num_classes=0),
            "vit": timm.create_model("test_vit", num_classes=0, patch_size=8, img_size=32)}
    files = {k: str(_safetensors(m, tmp_path / f"{k}.safetensors")) for k, m in srcs.items()}
    sets = [f"student.kwargs.backbone_files.{k}={v}" for k, v in files.items()]
    cfg = load_config(RunConfig, None,
                      ["student.name=raykd_test_fused_teacher", "student.pretrained=true", *sets])
    check_run_weights(cfg)
    torch.manual_seed(1)
    model = build_network(cfg.student, num_classes=3)
    assert torch.equal(model.cnn_a.conv1[0].weight, srcs["cnn_a"].conv1[0].weight)
    assert torch.equal(model.vit.patch_embed.proj.weight, srcs["vit"].patch_embed.proj.weight)


# --------------------------------------------------------------------------------------------------
# The shipped configs: the papers' ImageNet-pretrained models ask for weights, the CPU ones do not
# --------------------------------------------------------------------------------------------------


def _has_imagenet_weights(m: ModelConfig) -> bool:
    """Built from timm with published weights (a fused teacher: its backbones)."""
    if m.checkpoint or m.cut_blocks:
        return False
    return backbone_weights(m.name, m.kwargs, True) is not None or hub_source(m.name, m.kwargs).kind != ""


def _run_models(name: str) -> dict[str, ModelConfig]:
    cfg = load_config(RunConfig, ROOT / "configs" / f"{name}.yaml")
    return {role: m for role, m in (("student", cfg.student), ("teacher", cfg.teacher)) if m is not None}


def _space_models(name: str) -> dict[str, ModelConfig]:
    from raykd.config import from_dict

    space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
    out = {f"teachers.{k}": from_dict(ModelConfig, t.model) for k, t in space.teachers.items() if t.model}
    out.update({f"students.{k}": from_dict(ModelConfig, s.model) for k, s in space.students.items()})
    return out


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_paper_config_starts_its_pretrained_models_from_imagenet(name):
    for role, m in _run_models(name).items():
        assert m.pretrained == _has_imagenet_weights(m), (name, role, m.name)
        assert m.pretrained_file is None, "shipped configs name no machine's files"


@pytest.mark.parametrize("name", PAPER_SPACES)
def test_every_paper_space_starts_its_pretrained_models_from_imagenet(name):
    for role, m in _space_models(name).items():
        assert m.pretrained == _has_imagenet_weights(m), (name, role, m.name)


def test_the_papers_imagenet_models_are_the_ones_asking():
    asking = {(n, r, m.name) for n in PAPER_CONFIGS for r, m in _run_models(n).items() if m.pretrained}
    assert asking == {
        ("vit_teacher", "student", "vit_base_patch16_224.orig_in21k_ft_in1k"),  # google/vit-base-patch16-224
        ("resnet50_teacher", "student", "resnet50.tv_in1k"),  # torchvision's, as SSD-KD
        ("fused_teacher", "student", "raykd_fused_teacher"),  # its three backbones
        ("ssdkd_resnet50_mobilenetv2", "student", "mobilenetv2_100"),
    }
    spaces = {(n, r) for n in PAPER_SPACES for r, m in _space_models(n).items() if m.pretrained}
    assert spaces == {
        ("skindistilvit", "teachers.vit"), ("skindistilvit", "teachers.fcvit"),
        ("skindistilvit", "students.raykd_fcvit_base_patch16_224"),
        ("ssdkd", "teachers.resnet50"), ("ssdkd", "students.mobilenetv2_100"),
        ("hierattn", "teachers.resnet50"), ("fusion", "teachers.fused"),
    }


def test_the_default_the_cpu_config_and_the_default_space_use_no_weights():
    assert not ModelConfig().pretrained and not RunConfig().student.pretrained
    for m in _run_models("tiny_cpu").values():
        assert not m.pretrained and m.pretrained_file is None
    for m in _space_models("default").values():
        assert not m.pretrained and m.pretrained_file is None
    check_run_weights(load_config(RunConfig, ROOT / "configs" / "tiny_cpu.yaml"))  # nothing to reach

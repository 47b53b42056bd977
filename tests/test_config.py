"""Preset schema, YAML loading and --set overrides."""

import pytest

from mmlit_cli.config import available_presets, load_config, parse_overrides
from mmlit_cli.errors import ConfigError


def test_presets_load_and_validate():
    assert set(available_presets()) >= {"xxs", "xs", "s"}
    for name in ("xxs", "xs", "s"):
        cfg = load_config(name)
        assert cfg.name == name and cfg.model.image_size == 36 and cfg.mae.mask_ratio == 0.75


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("model:\n  embed_dm: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert "model.embed_dm" in str(e.value) and "mine.yaml" in str(e.value) and "embed_dim" in str(e.value)


def test_mistyped_value_is_rejected(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("model:\n  depth: twelve\n")
    with pytest.raises(ConfigError, match="model.depth: expected an integer"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"model.depth: expected an integer, got 'yes'$"):
        load_config("xxs", ["model.depth=yes"])  # YAML 1.1 read a boolean: "got True", nothing the user typed
    assert load_config("xxs", ["name=off"]).name == load_config("xxs", ['name="off"']).name == "off"  # not False
    assert load_config("xxs", ["finetune.ema=yes"]).finetune.ema is True  # a true/false key still takes the words
    assert load_config("xxs", ["finetune.ema=Off"]).finetune.ema is False
    assert load_config("xxs", ["finetune.ema=TRUE"]).finetune.ema is True
    bad.write_text("finetune:\n  augment:\n    hflip: yes please\n")
    with pytest.raises(ConfigError, match="finetune.augment.hflip"):
        load_config(str(bad))


def test_user_yaml_inherits_defaults(tmp_path):
    mine = tmp_path / "tiny.yaml"
    mine.write_text("model:\n  depth: 3\n  num_classes: 10\n")
    cfg = load_config(str(mine))
    assert cfg.name == "tiny" and cfg.model.depth == 3 and cfg.model.num_classes == 10


def test_a_section_the_user_yaml_gives_in_part_keeps_its_own_defaults(tmp_path):
    """A `pretrain:` that sets only its length keeps pre-training's defaults: it took
    fine-tuning's (label smoothing 0.1), which pre-training refuses, so the file could not
    pre-train at all."""
    from mmlit_cli.config import Config

    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\npretrain:\n  epochs: 5\n  augment:\n    crop_padding: 2\n")
    cfg, default = load_config(str(p)).pretrain, Config().pretrain
    assert (cfg.epochs, cfg.augment.crop_padding) == (5, 2)
    assert (cfg.label_smoothing, cfg.lr_base, cfg.augment.auto_augment) == (0.0, default.lr_base, "none")


def test_numbers_are_read_as_typed_not_as_yaml_1_1_reads_them(tmp_path):
    """PyYAML reads `0123` as octal (83) and `1:30` in base 60 (90): `--set finetune.seed=0123`
    trained with seed 83, without a word. A leading zero is decimal, as YAML 1.2 and the person
    typing it read it; a number with a colon is no number; hex and signs are as they were."""
    cfg = load_config("xs", ["finetune.seed=0123", "model.depth=010", "pretrain.seed=-007", "mae.decoder_dim=0x10"])
    assert (cfg.finetune.seed, cfg.model.depth, cfg.pretrain.seed, cfg.mae.decoder_dim) == (123, 10, -7, 16)
    for colon in ("finetune.seed=1:30", "finetune.lr=1:30.5"):
        with pytest.raises(ConfigError, match="expected (an integer|a number), got '1:30"):
            load_config("xs", [colon])
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nfinetune:\n  seed: 0123\n")
    assert load_config(str(p)).finetune.seed == 123
    with pytest.raises(ConfigError, match="'a' is given twice in one section"):
        parse_overrides(["model.expert_stages={a: 1, a: 2}"])


def test_set_overrides_are_parsed_and_validated():
    cfg = load_config("xs", ["model.depth=4", "finetune.lr=2e-3", "model.expert_stages=[2,2]",
                             "finetune.augment.auto_augment=rand"])
    assert cfg.model.depth == 4 and cfg.finetune.lr == 2e-3 and cfg.model.expert_stages == [2, 2]
    assert cfg.finetune.augment.auto_augment == "rand"
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match="unknown key 'model.dpth'"):
        load_config("xs", ["model.dpth=4"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_config("xs", ["finetune.lr=fast"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("xs", ["model.depth"])
    for bad in (5, {"model.depth": 4}):  # the Python API's overrides= of another type: was a raw TypeError
        with pytest.raises(ConfigError, match="overrides: expected a list of key.path=value strings"):
            load_config("xs", bad)
    with pytest.raises(ConfigError, match="--set expects key.path=value, got 4"):
        load_config("xs", [4])
    with pytest.raises(ConfigError, match="epochs must be positive"):
        load_config("xs", ["finetune.epochs=0"])


@pytest.mark.parametrize("preset", ["xxs", "xs", "s"])
def test_a_model_typed_with_extra_zeros_is_refused_before_it_is_built(preset):
    """embed_dim=100000000 was "internal error: RuntimeError: ... can't allocate memory", and
    depth=10000000 hung building layers; the estimate that refuses them is the presets' size
    within 2 %."""
    from mmlit_cli.model import MLiT

    cfg = load_config(preset)
    built = sum(p.numel() for p in MLiT(cfg.model).parameters())
    assert cfg.model.parameter_estimate() == pytest.approx(built, rel=0.02)
    for typo in ("model.depth=10000000", "model.embed_dim=19200", "model.mlp_hidden_first=960000000",
                 "model.num_classes=1000000000"):
        with pytest.raises(ConfigError, match=r"parameters, over the 1,000,000,000 mmlit builds \(the presets have"):
            load_config(preset, [typo])
    with pytest.raises(ConfigError, match=r"num_classes \(1000000000\)"):  # among the sizes it names
        load_config(preset, ["model.num_classes=1000000000"])


@pytest.mark.parametrize("setting,said", [
    ("pretrain.label_smoothing=0.3", "pretrain.label_smoothing is 0.3"),
    ("pretrain.augment.mixup_alpha=0.8", "pretrain.augment.mixup_alpha is 0.8"),
    ("pretrain.augment.cutmix_alpha=1", "pretrain.augment.cutmix_alpha is 1"),
    ("pretrain.class_balance=loss", "pretrain.class_balance is 'loss'"),
])
def test_what_acts_on_labels_is_refused_for_mae_pretraining(setting, said, tmp_path):
    """MAE's loss reconstructs pixels: these did nothing while the recipe line said they were on.
    A pretrain run refuses them before reading its data; a config (or a finetune checkpoint)
    that merely carries them in its pretrain section still loads."""
    from mmlit_cli.config import check_label_free
    from mmlit_cli.train import run_training

    said = f"{said}, but MAE pre-training uses no labels: it would do nothing"
    cfg = load_config("xs", [setting])  # load_checkpoint validates so too: a finetune checkpoint stays usable
    with pytest.raises(ConfigError, match=said):
        check_label_free(cfg.pretrain)
    with pytest.raises(ConfigError, match=said):  # before the data: this folder does not exist
        run_training("pretrain", "xs", str(tmp_path / "nowhere"), overrides=[setting], out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    check_label_free(load_config("xs", ["pretrain.class_balance=sampler", "pretrain.augment.mix_prob=1"]).pretrain)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="xxs"):
        load_config("huge")
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/p.yaml")


def test_a_mistyped_preset_name_is_given_its_likely_meaning(tmp_path, monkeypatch):
    """`--preset xss` listed the presets; `--preset xs.yaml` in a folder without that file said
    only "not found". As for a mistyped key, the likely preset is named."""
    with pytest.raises(ConfigError, match=r"^unknown preset 'xss': did you mean 'xs'\? use one of s, xs, xxs"):
        load_config("xss")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^preset file not found: xs.yaml \(the bundled preset is --preset xs\)$"):
        load_config("xs.yaml")
    with pytest.raises(ConfigError, match=r"^unknown preset 'huge': use one of"):
        load_config("huge")

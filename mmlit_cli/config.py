"""Preset schema, YAML loading and `--set key.path=value` overrides.

A preset is a YAML file with four sections: `model` (the network), `mae` (the masked
auto-encoder wrapped around it for pre-training), `finetune` and `pretrain` (the two
training recipes) plus `data` (normalisation). Every section is a dataclass below; the
dataclass *is* the schema. Loading walks the YAML and the dataclass together, so an unknown
key or a value of the wrong type is reported with its full dotted path and the file it came
from, before any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "presets"


# What `--resume` may change: how long the run goes on and where and how it runs. Everything
# else the run keeps as its checkpoint recorded it; an option asking otherwise is an error.
RESUME_MAY_CHANGE = ("--epochs, --patience, --workers, --data-dir, --download, --device, --compile, --compile-mode "
                     "and --save-every")
# The keys of a run's config section that --resume may change (with their options or --set).
RESUMED_CONFIG_MAY_CHANGE = ("epochs", "patience", "workers")


def _check_finite(section: Any, where: str) -> None:
    """NaN and inf in a section's numbers are errors: YAML and --set read `nan` and `inf` as
    floats, and every range check (`lr > 0`, ...) is False for NaN, so it would pass them."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if any(isinstance(x, float) and not math.isfinite(x) for x in (value if isinstance(value, (list, tuple))
                                                                       else [value])):
            raise ConfigError(f"{where}.{f.name} must be a finite number, got {value}")


# mLiT is for models of a few million parameters; one of a billion is a mistyped --set
MAX_PARAMETERS = 1e9


@dataclass
class ModelConfig:
    """The mLiT network. Defaults are the reconstructed `xs` preset's architecture (see MLIT-SPEC.md),
    without its stochastic depth (`drop_path` 0.05 there)."""

    image_size: int = 36
    patch_size: int = 3
    in_chans: int = 3
    num_classes: int = 100
    embed_dim: int = 128
    depth: int = 12
    num_heads: int = 8
    num_kv_heads: int = 4  # grouped-query attention: each kv head serves num_heads/num_kv_heads query heads
    qkv_bias: bool = True
    # Depth-wise scaling: SwiGLU hidden size of layer i goes linearly from first to last.
    mlp_hidden_first: int = 96
    mlp_hidden_last: int = 32
    # Staged expert counts: the layers are split into len(expert_stages) equal stages.
    expert_stages: list[int] = field(default_factory=lambda: [3, 4, 5])
    top_k: int = 2
    router_noise: float = 0.0  # std of Gaussian noise added to router logits while training
    aux_loss_weight: float = 0.0  # weight of the Switch-style load-balancing loss
    drop_path: float = 0.0
    norm_eps: float = 1e-6

    def hidden_sizes(self) -> list[int]:
        """SwiGLU hidden size per layer: `int((L-1-i)/(L-1) * (first-last)) + last`."""
        L = self.depth
        if L == 1:
            return [self.mlp_hidden_first]
        span = self.mlp_hidden_first - self.mlp_hidden_last
        return [int((L - 1 - i) / (L - 1) * span) + self.mlp_hidden_last for i in range(L)]

    def experts_per_layer(self) -> list[int]:
        """Number of experts per layer: equal stages taken from `expert_stages`."""
        stages = self.expert_stages
        return [stages[i * len(stages) // self.depth] for i in range(self.depth)]

    def parameter_estimate(self) -> float:
        """About how many parameters the model has (within a few per cent: per-layer sizes are
        taken at their mean), in closed form, so that a depth or width typed with extra zeros is
        refused before a layer is built (`MAX_PARAMETERS`)."""
        D, H, KV = self.embed_dim, self.num_heads, self.num_kv_heads
        hd = D / H
        hidden = (self.mlp_hidden_first + self.mlp_hidden_last) / 2
        experts = sum(self.expert_stages) / len(self.expert_stages)
        layer = 4 * D + D * (H + 2 * KV) * hd + H * hd * D + D * experts + D * (experts + 1) * hidden + hidden * D
        ends = self.patch_size ** 2 * self.in_chans * D + (self.num_patches + 2) * D + D * (self.num_classes + 3)
        return self.depth * layer + ends

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model: {msg}")

        _check_finite(self, "model")

        def whole(name: str) -> int:  # the Python API's keywords (create_model) are not type-checked as YAML is
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
            return value

        for name in ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                     "num_kv_heads", "mlp_hidden_first", "mlp_hidden_last", "top_k"):
            need(whole(name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(whole("num_classes") >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        need(self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        need(self.embed_dim % self.num_heads == 0,
             f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        need(len(self.expert_stages) > 0 and all(e > 0 for e in self.expert_stages),
             f"expert_stages must be a non-empty list of positive counts, got {self.expert_stages}")
        need(self.top_k <= min(self.expert_stages),
             f"top_k {self.top_k} is larger than the smallest expert count {min(self.expert_stages)}")
        need(0.0 <= self.drop_path < 1.0, f"drop_path must be in [0, 1), got {self.drop_path}")
        need(self.norm_eps >= 0, f"norm_eps must be >= 0 (it keeps LayerNorm from dividing by zero), got "
                                 f"{self.norm_eps}")
        need(self.router_noise >= 0 and self.aux_loss_weight >= 0,
             "router_noise and aux_loss_weight must be >= 0")
        size = self.parameter_estimate()  # a typo's model: out of memory, or minutes building layers
        need(size <= MAX_PARAMETERS, f"about {size:.3g} parameters, over the {MAX_PARAMETERS:,.0f} mmlit builds (the "
                                     f"presets have 0.66 M to 2.4 M): check depth ({self.depth}), embed_dim "
                                     f"({self.embed_dim}), num_classes ({self.num_classes}), image_size "
                                     f"({self.image_size}: the position embedding grows with its square), the MLP "
                                     f"sizes and expert_stages")


@dataclass
class MAEConfig:
    """The masked auto-encoder around the encoder (mmLiT pre-training)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_kv_heads: int = 2
    decoder_mlp_hidden: int = 128
    visible_loss_weight: float = 0.1  # discount on the reconstruction loss of visible patches
    norm_pix_loss: bool = True  # per-patch normalised pixel targets, as in the original MAE

    def validate(self) -> None:
        _check_finite(self, "mae")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mae: mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if min(self.decoder_dim, self.decoder_depth, self.decoder_heads, self.decoder_kv_heads,
               self.decoder_mlp_hidden) <= 0:
            raise ConfigError("mae: decoder_dim, decoder_depth, decoder_heads, decoder_kv_heads and "
                              "decoder_mlp_hidden must be positive")
        if self.decoder_dim % self.decoder_heads or self.decoder_heads % self.decoder_kv_heads:
            raise ConfigError("mae: decoder_dim must divide by decoder_heads, and decoder_heads by "
                              "decoder_kv_heads")
        if self.visible_loss_weight < 0:
            raise ConfigError("mae: visible_loss_weight must be >= 0")


@dataclass
class AugmentConfig:
    """Per-sample (torchvision transforms v2) and per-batch augmentation."""

    crop_padding: int = 4  # random crop with this much padding; 0 = off
    hflip: float = 0.5
    auto_augment: str = "trivial"  # trivial | rand | none
    auto_augment_prob: float = 1.0  # the share of images that get it (the rest pass unchanged)
    randaug_num_ops: int = 2
    randaug_magnitude: int = 9
    random_erasing: float = 0.25
    mixup_alpha: float = 0.8  # 0 = off
    cutmix_alpha: float = 1.0  # 0 = off
    mix_prob: float = 1.0  # probability that a batch is mixed at all

    def validate(self, where: str) -> None:
        _check_finite(self, f"{where}.augment")
        if self.auto_augment not in ("trivial", "rand", "none"):
            raise ConfigError(f"{where}.augment.auto_augment must be trivial, rand or none, "
                              f"got {self.auto_augment!r}")
        for name in ("hflip", "auto_augment_prob", "random_erasing", "mix_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{where}.augment.{name} must be in [0, 1]")
        if self.crop_padding < 0 or self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError(f"{where}.augment: crop_padding and mix alphas must be >= 0")


LOADERS = ("auto", "device", "workers")


CLASS_BALANCE = ("none", "loss", "sampler")
BALANCE_LOSSES = ("logit-adjust", "inverse-frequency")


@dataclass
class TrainConfig:
    """A training recipe (used by `finetune` and `pretrain`)."""

    epochs: int = 100
    batch_size: int = 128  # per process
    # Peak learning rate per 256 images of global batch (batch_size x processes), as DeiT and
    # MAE give it: lr = lr_base * batch_size * processes / 256. `lr`, when set, is used as is.
    lr_base: float = 2e-3
    lr: Optional[float] = None
    # auto: fit warm-up and regularisation to the run's length (recipe.py); paper: as written.
    recipe: str = "auto"
    # cosine: linear warm-up from 0, then cosine down to min_lr (the paper's). one-cycle:
    # PyTorch's OneCycleLR, warm-up fraction warmup_epochs / epochs; it sets beta1 (0.95 at
    # low lr, 0.85 at the peak) and ends at lr / 2.5e5, so min_lr and betas[0] are unused.
    schedule: str = "cosine"
    # With schedule cosine: the share of one-cycle's curve mixed into it, lr and beta1 alike
    # (share x one-cycle + (1 - share) x cosine); the auto recipe moves it from 1 in short runs
    # to 0 at the preset's length, so the schedule changes shape gradually with the run.
    one_cycle_share: float = 0.0
    min_lr: float = 1e-5
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05  # not applied to norms, biases, tokens and position embeddings
    decay_all: bool = False  # ...unless this is true, as in a plain AdamW(model.parameters())
    # The share of weight_decay those parameters get when decay_all is false (0: none, as timm
    # and the paper; 1: as decay_all); the auto recipe moves it with one_cycle_share.
    no_decay_share: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    label_smoothing: float = 0.1
    ema: bool = False
    ema_decay: float = 0.9998
    layer_decay: float = 1.0  # layer-wise lr decay; applied when starting from a pre-trained encoder
    seed: int = 0
    workers: int = 2
    # Where batches come from. device: the decoded split lives on the training device and is
    # shuffled, batched and augmented there (data/device_loader.py); workers: a DataLoader
    # with `workers` processes augmenting image by image; auto: device where the split fits.
    # A run records what auto chose, so --resume replays the same batches.
    loader: str = "auto"
    # Early stopping: end the run when its monitored validation figure (top-1; MAE: loss) has
    # not improved for this many epochs; 0 = never.
    patience: int = 0
    # Class imbalance (fine-tuning). loss: `balance_loss` reweights the loss by the training
    # split's class frequencies; sampler: batches drawn class-balanced (with replacement).
    class_balance: str = "none"
    # logit-adjust: train on logits + log(class prior) (Menon et al. 2021); inverse-frequency:
    # cross-entropy weighted by N / (classes x class count). Measured in docs/RESULTS.md.
    balance_loss: str = "logit-adjust"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, where: str) -> None:
        _check_finite(self, where)
        if self.epochs <= 0:
            raise ConfigError(f"{where}.epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise ConfigError(f"{where}.batch_size must be positive, got {self.batch_size}")
        # torch's generators take 64 bits, and mmlit adds offsets per rank, epoch and step (a recorded
        # run's seed is checked too: the bound is what could never have trained)
        if not -2**62 <= self.seed < 2**62:
            raise ConfigError(f"{where}.seed must be a whole number between -2**62 and 2**62, got {self.seed}")
        if self.lr_base <= 0 or (self.lr is not None and self.lr <= 0) or self.min_lr < 0:
            raise ConfigError(f"{where}: lr_base and lr must be positive and min_lr >= 0")
        if self.recipe not in ("auto", "paper"):
            raise ConfigError(f"{where}.recipe must be auto or paper, got {self.recipe!r}")
        if self.schedule not in ("cosine", "one-cycle"):
            raise ConfigError(f"{where}.schedule must be cosine or one-cycle, got {self.schedule!r}")
        if not (0.0 <= self.one_cycle_share <= 1.0 and 0.0 <= self.no_decay_share <= 1.0):
            raise ConfigError(f"{where}: one_cycle_share and no_decay_share must be in [0, 1]")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"{where}: warmup_epochs, weight_decay and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}.betas must be two numbers in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{where}.label_smoothing must be in [0, 1)")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"{where}.layer_decay must be in (0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:  # outside, the average diverges (-5 saved NaN weights)
            raise ConfigError(f"{where}.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.workers < 0:
            raise ConfigError(f"{where}.workers must be >= 0")
        if self.class_balance not in CLASS_BALANCE:
            raise ConfigError(f"{where}.class_balance must be {', '.join(CLASS_BALANCE)}, got {self.class_balance!r}")
        if self.balance_loss not in BALANCE_LOSSES:
            raise ConfigError(f"{where}.balance_loss must be {' or '.join(BALANCE_LOSSES)}, got {self.balance_loss!r}")
        if self.patience < 0:
            raise ConfigError(f"{where}.patience must be >= 0 (0 = no early stopping)")
        if self.loader not in LOADERS:
            raise ConfigError(f"{where}.loader must be {', '.join(LOADERS)}, got {self.loader!r}")
        self.augment.validate(where)


def check_label_free(recipe: TrainConfig) -> None:
    """MAE pre-training reconstructs pixels: what acts on labels (smoothing, MixUp/CutMix's label
    mixing, the loss reweighted by class) would do nothing there, while the recipe line and
    config.yaml said it was on. Checked when a pretrain run is planned, not in `Config.validate`:
    a finetune config (or checkpoint) may carry any pretrain section it never reads."""
    a = recipe.augment
    label_uses = [("label_smoothing", recipe.label_smoothing, 0), ("augment.mixup_alpha", a.mixup_alpha, 0),
                  ("augment.cutmix_alpha", a.cutmix_alpha, 0)]
    if recipe.class_balance == "loss":  # (a class-balanced sampler still draws the images evenly, where labelled)
        label_uses.append(("class_balance", "loss", "none"))
    for key, value, off in label_uses:
        if value != off:
            shown = repr(value) if isinstance(value, str) else f"{value:g}"
            raise ConfigError(f"pretrain.{key} is {shown}, but MAE pre-training uses no labels: it would do "
                              f"nothing; leave it at {off!r} (it belongs to finetune)")


def _pretrain_defaults() -> TrainConfig:
    return TrainConfig(lr_base=1.5e-3, label_smoothing=0.0, grad_clip=0.0,
                       augment=AugmentConfig(auto_augment="none", random_erasing=0.0,
                                             mixup_alpha=0.0, cutmix_alpha=0.0))


@dataclass
class DataConfig:
    """How images are turned into tensors. `image_size` lives in `model`."""

    mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: list[float] = field(default_factory=lambda: [0.2470, 0.2435, 0.2616])
    val_fraction: float = 0.1  # held out, stratified, when a dataset has no validation split

    def validate(self) -> None:
        _check_finite(self, "data")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("data: mean and std must be three numbers each, std > 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    pretrain: TrainConfig = field(default_factory=_pretrain_defaults)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.mae.validate()
        self.finetune.validate("finetune")
        self.pretrain.validate("pretrain")
        self.data.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- schema walking

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:  # YAML 1.1's words: `hflip: yes` still works
            return _YAML11_BOOLS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {where}")  # a bug in the schema, not user input


def _unknown_key(cls: type, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
    path = f"{where}.{key}" if where else key
    return ConfigError(f"unknown key '{path}'{hint}")


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, str(key), where)
        path = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --------------------------------------------------------------------------- public API

def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_preset_path(preset: str) -> Path:
    """A preset name (`xs`) or a path to a user's YAML file."""
    path = Path(preset).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise ConfigError(f"{path} is a folder: a preset is a name ({', '.join(available_presets())}) or a "
                              f"YAML file")
        if not path.is_file():
            bundled = f" (the bundled preset is --preset {path.stem})" if path.stem in available_presets() else ""
            raise ConfigError(f"preset file not found: {path}{bundled}")
        return path
    candidate = PRESET_DIR / f"{preset}.yaml"
    if candidate.is_file():
        return candidate
    close = difflib.get_close_matches(preset, available_presets(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"unknown preset '{preset}': {hint}use one of {', '.join(available_presets())} "
                      "or a path to a YAML file")


class _DuplicateKey(Exception):
    pass


class _PresetLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error: YAML
    keeps the last silently, and an edited preset with `depth: 9` left above `depth: 4` would
    train a model its author did not read."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float)) and key in seen:
                raise _DuplicateKey(f"'{key}' is given twice in one section (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _decimal(construct):
    """PyYAML reads numbers as YAML 1.1 does: `0123` is octal (83) and `1:30` base 60 (90), so
    `--set finetune.seed=0123` trained with seed 83, without a word. As YAML 1.2 and the person
    typing them read them: a leading zero is decimal, and a number with a colon is no number
    (left a string, which a number field refuses)."""
    def number(loader, node):
        text = loader.construct_scalar(node).replace("_", "")
        digits = text.lstrip("+-")
        if ":" in digits:
            return text
        if len(digits) > 1 and digits[0] == "0" and digits[1] in "0123456789":
            return int(text, 10) if digits.isdigit() else construct(loader, node)
        return construct(loader, node)
    return number


_YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}


def _boolean(loader, node):
    """PyYAML reads `yes`, `no`, `on` and `off` as YAML 1.1 does, as true and false: `--set
    model.depth=yes` said "got True", and `--set name=off` named a run "False". As YAML 1.2
    reads them, they are words; a true/false key takes them still (`_coerce`)."""
    text = loader.construct_scalar(node)
    return text if text.lower() in _YAML11_BOOLS else yaml.SafeLoader.construct_yaml_bool(loader, node)


_PresetLoader.add_constructor("tag:yaml.org,2002:bool", _boolean)
_PresetLoader.add_constructor("tag:yaml.org,2002:int", _decimal(yaml.SafeLoader.construct_yaml_int))
_PresetLoader.add_constructor("tag:yaml.org,2002:float", _decimal(yaml.SafeLoader.construct_yaml_float))


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`["model.depth=4", "finetune.lr=1e-3"]` -> nested dict. Values are parsed as YAML."""
    nested: dict[str, Any] = {}
    if overrides is not None and (isinstance(overrides, (str, bytes)) or not isinstance(overrides, (list, tuple))):
        raise ConfigError(f"overrides: expected a list of key.path=value strings, got {overrides!r}")
    for item in overrides or []:
        if not isinstance(item, str):
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        try:
            value = yaml.load(raw, Loader=_PresetLoader) if raw.strip() else ""
        except _DuplicateKey as e:
            raise ConfigError(f"--set {item!r}: {e}") from None
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r} conflicts with another --set of '{part}'")
        node[parts[-1]] = value
    return nested


def pinned_keys(overrides: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of a nested `--set` dict: {"finetune": {"lr": 1}} -> {"finetune.lr"}."""
    keys = set()
    for k, v in overrides.items():
        path = f"{prefix}{k}"
        keys |= pinned_keys(v, path + ".") if isinstance(v, dict) else {path}
    return keys


def own_preset_keys(preset: str | Path) -> set[str]:
    """The dotted keys (`finetune.epochs`, ...) a user's own preset file sets; none for a bundled
    preset. A length such a file gives stands where mmlit would pick one (the bundled sample's
    short runs): a run's config.yaml given back as --preset trained 4 epochs, not its own."""
    return set() if bundled_preset(preset) else pinned_keys(_preset_data(resolve_preset_path(str(preset))))


def bundled_preset(preset: str | Path) -> bool:
    """Whether `preset` (a name or a path) is one of mmlit's own presets, not a user's file."""
    return resolve_preset_path(str(preset)).resolve().parent == PRESET_DIR.resolve()


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """A config from a preset's mapping: what it leaves out is the schema's default, section by
    section (a `pretrain:` that sets only its epochs keeps pre-training's defaults, not
    fine-tuning's label smoothing, which pre-training refuses)."""
    try:
        return _build(Config, _merge(dataclasses.asdict(Config()), data)).validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(preset: str | Path = "xs", overrides: list[str] | None = None) -> Config:
    """Load a preset by name or path, apply `--set` overrides and validate the result."""
    path = resolve_preset_path(str(preset))
    data = _preset_data(path)
    data.setdefault("name", path.stem)
    return with_overrides(config_from_dict(data, str(path)), overrides)


def _preset_data(path: Path) -> dict[str, Any]:
    """A preset file's mapping, as written."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_PresetLoader) or {}  # not the locale's
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except UnicodeDecodeError:  # a checkpoint or an image given as --preset
        hint = ": a checkpoint goes to --init, eval or predict" if path.suffix == ".safetensors" else ""
        raise ConfigError(f"{path} is not a YAML preset (not text){hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise ConfigError(f"cannot read preset {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a YAML mapping")
    return data


def with_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """`cfg` with `--set` overrides applied, validated."""
    over = parse_overrides(overrides)
    return with_values(cfg, over, "--set") if over else cfg


def with_values(cfg: Config, values: dict[str, Any], source: str) -> Config:
    """`cfg` with nested `values` ({"model": {"depth": 4}}) applied, checked as a preset's are:
    an unknown key or a wrong type is a `ConfigError` naming `source`."""
    return config_from_dict(_merge(cfg.to_dict(), values), source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

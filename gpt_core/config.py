"""Model configuration: one dataclass, a registry of named presets, and a preset-based spec."""

from dataclasses import asdict, dataclass, fields, replace

from .errors import GptflowError
from .settings import Settings, SettingsError, setting


@dataclass(frozen=True)
class ModelConfig(Settings):
    vocab_size: int = setting(50257, gt=0)
    context_length: int = setting(1024, gt=0)
    emb_dim: int = setting(768, gt=0)
    n_heads: int = setting(12, gt=0)
    n_layers: int = setting(12, gt=0)
    drop_rate: float = setting(0.0, ge=0, lt=1)
    qkv_bias: bool = True
    # The book's GPTModel keeps a separate output head; GPT-2's checkpoints tie it to the
    # token embedding. Tying saves vocab_size * emb_dim parameters on small CPU models.
    tie_weights: bool = False
    # The output head: None for next-token logits over the vocabulary, else a classification
    # head of this many classes (the book's chapter 6), which is never tied.
    num_classes: int | None = setting(None, ge=2)

    def __post_init__(self):
        try:
            super().__post_init__()
        except SettingsError as err:
            raise SettingsError(f"model config: {err}") from None
        if self.emb_dim % self.n_heads:
            raise SettingsError(
                f"model config: emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if self.num_classes is not None and self.tie_weights:
            raise SettingsError("model config: a classification head cannot be tied to the token embedding")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GptflowError(f"model config: unknown key(s) {', '.join(unknown)}")
        return cls(**values)


PRESETS: dict[str, ModelConfig] = {
    # OpenAI GPT-2 shapes (the book's GPT_CONFIG_124M and its larger siblings).
    "gpt2-small": ModelConfig(emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": ModelConfig(emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": ModelConfig(emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": ModelConfig(emb_dim=1600, n_heads=25, n_layers=48),
    # Small shapes that train in minutes on a laptop CPU.
    "gpt-mini": ModelConfig(context_length=256, emb_dim=256, n_heads=4, n_layers=4, tie_weights=True),
    "gpt-micro": ModelConfig(context_length=128, emb_dim=128, n_heads=4, n_layers=2, tie_weights=True),
    # Test-sized: a forward pass takes milliseconds.
    "gpt-nano": ModelConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2, tie_weights=True),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, optionally with some fields replaced (e.g. context_length=256)."""
    if name not in PRESETS:
        raise SettingsError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SettingsError(f"model config: unknown key(s) {', '.join(unknown)}")
    config = replace(PRESETS[name], **overrides)
    base = PRESETS[name]
    if name.startswith("gpt2-") and config.context_length > base.context_length:
        raise SettingsError(
            f"context_length {config.context_length} exceeds what preset '{name}' supports "
            f"({base.context_length})")
    return config


@dataclass(frozen=True)
class ModelSpec(Settings):
    """A preset from PRESETS, with some of its fields replaced (None keeps the preset's)."""

    preset: str = setting("gpt-mini", doc=f"one of {', '.join(PRESETS)}")
    context_length: int | None = setting(None, gt=0, doc="tokens the model attends over; none: the preset's")
    drop_rate: float | None = setting(None, ge=0, lt=1, doc="dropout probability; none: the preset's")
    qkv_bias: bool | None = setting(None, doc="biases in the query, key and value projections; none: the preset's")
    tie_weights: bool | None = setting(None, doc="output head shares the token embedding's weights; none: the preset's")

    def __post_init__(self):
        super().__post_init__()
        self.build()

    def build(self) -> ModelConfig:
        overrides = {f.name: getattr(self, f.name) for f in fields(self)
                     if f.name != "preset" and getattr(self, f.name) is not None}
        return get_preset(self.preset, **overrides)

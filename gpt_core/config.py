"""Model configuration: one dataclass and a registry of named presets."""

from dataclasses import asdict, dataclass, fields, replace

from .errors import GptflowError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    # The book's GPTModel keeps a separate output head; GPT-2's checkpoints tie it to the
    # token embedding. Tying saves vocab_size * emb_dim parameters on small CPU models.
    tie_weights: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise GptflowError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise GptflowError(
                f"model config: emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise GptflowError(f"model config: drop_rate must be in [0, 1), got {self.drop_rate}")

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
        raise GptflowError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise GptflowError(f"model config: unknown key(s) {', '.join(unknown)}")
    config = replace(PRESETS[name], **overrides)
    base = PRESETS[name]
    if name.startswith("gpt2-") and config.context_length > base.context_length:
        raise GptflowError(
            f"context_length {config.context_length} exceeds what preset '{name}' supports "
            f"({base.context_length})")
    return config

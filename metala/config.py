"""MetaLA model configuration: one typed dataclass, validated in one place, plus the named presets.

Field names and defaults follow `shared/spec/metala.md` section 8. Derived fields (`qk_dim`, `intermediate_size`,
`norm_eps`) may be left unset (None) and are resolved from `d_model` / `norm_type` in `__post_init__`, so a resolved
config always holds concrete numbers and round-trips through `to_dict()` / `from_dict()`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

_NORM_TYPES = ("rmsnorm", "layernorm")
_INIT_SCHEMES = ("neox", "normal")
_ATTN_BACKENDS = ("auto", "naive", "chunk", "triton")


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def swiglu_width(d_model: int, multiple_of: int) -> int:
    """SwiGLU hidden width: 8d/3 rounded up to `multiple_of` (GPT-NeoX / R-neox rule)."""
    return multiple_of * math.ceil((8 * d_model / 3) / multiple_of)


@dataclass(kw_only=True, slots=True)
class MetaLAConfig:
    """Architecture of a MetaLA language model.

    Required: `vocab_size`, `d_model`, `n_layers`, `n_heads`. Per head the query/decay width is qk_dim / n_heads and
    the value width d_model / n_heads; both must be powers of two >= 16 (Triton tile sizes).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    # query/decay width; None means d_model / 2 (the paper's LM setting)
    qk_dim: int | None = None
    conv_size: int = 4
    decay_normalizer: float = 16.0
    # SwiGLU width; None means ceil(8d/3) rounded up to ffn_multiple_of
    intermediate_size: int | None = None
    ffn_multiple_of: int = 256
    norm_type: str = "rmsnorm"
    # None means 1e-6 for rmsnorm and 1e-5 for layernorm
    norm_eps: float | None = None
    head_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_scheme: str = "neox"
    init_std: float = 0.02
    doc_reset: bool = True
    self_aug: bool = True
    use_conv: bool = True
    use_key: bool = False
    # runtime choice of the operator implementation; "auto" is triton on CUDA, chunk elsewhere
    attn_backend: str = "auto"
    # runtime choice: hand the self-augmentation to the operator, which fuses it into its Triton kernels (the
    # PyTorch backends add the same fp32 term after the recurrence); False runs it as a separate module
    fuse_self_aug: bool = True
    # runtime choice: with the fused self-augmentation and bf16 inputs, the Triton operator returns its fp32 output as
    # two bf16 halves (metala.ops.metala.SplitOutput), so that its gradient comes back in bf16
    split_op_output: bool = True
    # positions per cross-entropy chunk in the training loss (0 = one pass); bounds fp32 logit memory
    loss_chunk_size: int = 0
    # free-form provenance (e.g. the preset name); never read by the model
    name: str = field(default="custom")

    def __post_init__(self) -> None:
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "conv_size", "ffn_multiple_of"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        if self.qk_dim is None:
            if self.d_model % 2:
                raise ValueError(f"d_model must be even when qk_dim is derived (d/2), got d_model={self.d_model}")
            self.qk_dim = self.d_model // 2
        if not isinstance(self.qk_dim, int) or self.qk_dim < 1:
            raise ValueError(f"qk_dim must be a positive integer, got {self.qk_dim!r}")
        if self.intermediate_size is None:
            self.intermediate_size = swiglu_width(self.d_model, self.ffn_multiple_of)
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be a positive integer, got {self.intermediate_size!r}")
        if self.norm_type not in _NORM_TYPES:
            raise ValueError(f"norm_type must be one of {_NORM_TYPES}, got {self.norm_type!r}")
        if self.norm_eps is None:
            self.norm_eps = 1e-6 if self.norm_type == "rmsnorm" else 1e-5
        if self.init_scheme not in _INIT_SCHEMES:
            raise ValueError(f"init_scheme must be one of {_INIT_SCHEMES}, got {self.init_scheme!r}")
        if self.attn_backend not in _ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {_ATTN_BACKENDS}, got {self.attn_backend!r}")
        for flag in ("fuse_self_aug", "split_op_output"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.qk_dim % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide qk_dim ({self.qk_dim})")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        # tl.dot needs tiles of at least 16 and power-of-two block shapes
        for fname, width in (("qk_dim", self.head_qk_dim), ("d_model", self.head_v_dim)):
            if width < 16 or not _is_pow2(width):
                raise ValueError(
                    f"{fname} / n_heads must be a power of two >= 16 (got {width} from {fname}="
                    f"{getattr(self, fname)}, n_heads={self.n_heads})"
                )
        if not self.decay_normalizer > 0:
            raise ValueError(f"decay_normalizer must be > 0, got {self.decay_normalizer}")
        for fname in ("norm_eps", "head_norm_eps", "init_std"):
            if not getattr(self, fname) > 0:
                raise ValueError(f"{fname} must be > 0, got {getattr(self, fname)}")
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be >= 0, got {self.loss_chunk_size}")

    @property
    def head_qk_dim(self) -> int:
        return self.qk_dim // self.n_heads

    @property
    def head_v_dim(self) -> int:
        return self.d_model // self.n_heads

    def layer_param_count(self) -> int:
        """Parameters of one block (metala.md section 8 formula plus the ablation switches and affine norms)."""
        d, f, k = self.d_model, self.intermediate_size, self.conv_size
        # W_q, W_a (d x qk_dim each), W_v, W_g, W_o (d x d each), b_g
        n = 2 * d * self.qk_dim + 3 * d * d + d
        n += 3 * d * f
        n += k * d if self.use_conv else 0
        n += self.qk_dim if self.self_aug else 0
        n += d * self.qk_dim if self.use_key else 0
        n += 4 * d if self.norm_type == "layernorm" else 0
        return n

    def param_count(self) -> int:
        n = self.n_layers * self.layer_param_count()
        n += self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        n += 2 * self.d_model if self.norm_type == "layernorm" else 0
        return n

    def non_embedding_param_count(self) -> int:
        """Matmul weights for MFU: every block weight plus the LM-head GEMM once (performance.md section 1)."""
        return self.n_layers * self.layer_param_count() + self.vocab_size * self.d_model

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetaLAConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown MetaLAConfig field {k!r}{hint}")
        missing = [n for n in ("vocab_size", "d_model", "n_layers", "n_heads") if n not in d]
        if missing:
            raise ValueError(f"MetaLAConfig is missing required field {missing[0]!r}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MetaLAConfig":
        """A named preset (metala.md section 8), optionally with field overrides, e.g. vocab_size=50304."""
        key = name.lower()
        if key not in PRESETS:
            close = difflib.get_close_matches(key, list(PRESETS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}{hint}")
        d = dict(PRESETS[key])
        d["name"] = key
        d.update(overrides)
        return cls.from_dict(d)


# H = d / 128 everywhere (d_k' = 64, d_v' = 128) except tiny; V = 32000 is our SentencePiece default
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=2, ffn_multiple_of=64, tie_embeddings=True),
    "125m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=6, tie_embeddings=True),
    "360m": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=8, tie_embeddings=True),
    "1.3b": dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, tie_embeddings=True),
    "1.4b": dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, tie_embeddings=False),
    "3b": dict(vocab_size=32000, d_model=2560, n_layers=36, n_heads=20, tie_embeddings=True),
}

"""A small GPT for byte-level language modelling (nanoGPT's shape, trimmed to the demo).

Pre-LayerNorm transformer blocks, causal self-attention through
``scaled_dot_product_attention``, a GELU MLP, and an output layer tied to the token
embedding (or a separate one, ``tied_output=False``). Bytes are the tokens, so the
vocabulary is 256 and no tokenizer is needed.
The model holds no buffers: DDP then has nothing to broadcast on each forward, so the
bytes it sends are the gradient all-reduce alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

VOCAB_SIZE = 256  # one token per byte


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model; ``num_parameters`` is known before anything is allocated."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    tied_output: bool = True  # the output layer is the token embedding

    def __post_init__(self):
        bad = {name: value for name, value in (("n_layer", self.n_layer), ("n_head", self.n_head),
                                               ("n_embd", self.n_embd), ("block_size", self.block_size))
               if not (isinstance(value, int) and value > 0)}
        if bad:
            raise ValueError(f"GPTConfig: {bad} must be positive integers")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not a multiple of n_head={self.n_head}; "
                             f"pick n_head among {[h for h in range(1, 17) if self.n_embd % h == 0]}")

    @property
    def num_parameters(self) -> int:
        d = self.n_embd
        per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        head = 0 if self.tied_output else VOCAB_SIZE * d
        return VOCAB_SIZE * d + self.block_size * d + self.n_layer * per_block + 2 * d + head


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.out = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Byte-level GPT: ``forward(idx, targets)`` returns (logits, mean cross-entropy or None)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(VOCAB_SIZE, config.n_embd)
        self.pos = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream
        # does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "out.weight")):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.n_layer))
        # Made last, so every other weight starts as in the tied model of the same seed.
        self.head = None if config.tied_output else nn.Linear(config.n_embd, VOCAB_SIZE, bias=False)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size={self.config.block_size}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        output = self.tok.weight if self.head is None else self.head.weight
        logits = F.linear(self.ln_f(x), output)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, VOCAB_SIZE), targets.reshape(-1))

    def param_groups(self, weight_decay: float, embedding_lr_scale: float = 1.0) -> list[dict]:
        """Split parameters: matrices and embeddings decay, biases and LayerNorm gains do not.

        With ``embedding_lr_scale`` != 1 the token and position embeddings (the token one
        is also the output layer) form a group of their own whose ``lr_scale`` says what
        multiple of the scheduled lr it takes; every group carries an ``lr_scale``.
        """
        embeddings = [self.tok.weight, self.pos.weight] if embedding_lr_scale != 1.0 else []
        separate = {id(p) for p in embeddings}
        decay = [p for p in self.parameters() if p.dim() >= 2 and id(p) not in separate]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0}]
        if embeddings:
            groups.append({"params": embeddings, "weight_decay": weight_decay, "lr_scale": embedding_lr_scale})
        return groups + [{"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]

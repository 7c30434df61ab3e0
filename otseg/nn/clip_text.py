"""Class names × prompt templates → (K, N, C) prompt embeddings.

Two sources, used in this order for each name:
1. a stored bank of embeddings (the original ``.npy`` files), used exactly as stored (fp16);
2. the frozen CLIP text tower, encoding ``template.format(name)`` for each template.
Encoded names are cached, so re-asking for a vocabulary costs a dictionary look-up.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.prompts import fill
from ..errors import UserError
from .clip_image import block_forward


class LockedCache:
    """A cache guarded by ``self._lock``: a copy or an unpickled object gets a fresh lock (a
    lock itself neither copies nor pickles), so ``copy.deepcopy`` and ``torch.save`` of a
    model work."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        parent = getattr(super(), "__setstate__", None)  # nn.Module's, for modules
        if parent is None:
            self.__dict__.update(state)
        else:
            parent(state)
        self._lock = threading.Lock()


class TextTower(nn.Module):
    """The frozen open_clip text transformer, run only up to the longest prompt's end token."""

    def __init__(self, clip: nn.Module, tokenizer) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.tokenizer = tokenizer
        self.context_length = int(clip.positional_embedding.shape[0])
        for p in self.parameters():
            p.requires_grad_(False)

    def check_lengths(self, prompts: Sequence[str]) -> None:
        """Raise ``ValueError`` naming the prompts that exceed the text context."""
        enc = self.tokenizer.tokenizer if hasattr(self.tokenizer, "tokenizer") else self.tokenizer
        if not hasattr(enc, "encode"):
            return
        limit = self.context_length - 2  # start and end tokens
        too_long = [p for p in prompts if len(enc.encode(p)) > limit]
        if too_long:
            raise UserError(
                f"{len(too_long)} prompt(s) exceed CLIP's {limit}-token text context, e.g. "
                f"{too_long[0][:80]!r}; use shorter class names"
            )

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts: n strings → (n, C) unit-norm embeddings (float32)."""
        self.check_lengths(prompts)
        tokens, eot = self.tokenize(prompts)
        return self.encode_embeddings(self.token_embedding(tokens), eot)

    def tokenize(
        self, prompts: Sequence[str], device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n prompts → (n, L) token ids up to the longest prompt's end token and the (n,) end
        positions, on ``device`` (default: the tower's). The end handling of every text
        encoding (templates here, ZegOT's learned prompts): L is computed on the host."""
        tokens = self.tokenizer(list(prompts))  # (n, context) zero-padded, start token first
        eot = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
        # Causal attention: tokens after the longest prompt's end cannot change earlier ones.
        length = int(eot.max()) + 1
        device = self.token_embedding.weight.device if device is None else device
        return tokens[:, :length].to(device), eot.to(device)

    def encode_embeddings(
        self, x: torch.Tensor, eot: torch.Tensor, *, checkpointing: bool = False
    ) -> torch.Tensor:
        """Token embeddings → unit-norm text embeddings, differentiable (learned prompts).

        x: (n, L, W) token embeddings of sequences whose end tokens all lie before L;
        eot: (n,) end-token positions. Returns (n, C) float32.
        checkpointing: recompute the text blocks in the backward pass (saves activations).
        """
        length = x.shape[1]
        x = x + self.positional_embedding[:length]
        previous = getattr(self.transformer, "grad_checkpointing", False)
        self.transformer.grad_checkpointing = checkpointing and torch.is_grad_enabled()
        mask = self.attn_mask[:length, :length]
        try:
            batch_first = getattr(self.transformer, "batch_first", True)
            if batch_first and not torch.is_grad_enabled():  # inference: no attention matrix
                for block in self.transformer.resblocks:
                    x = block_forward(block, x, mask)
            else:
                x = self.transformer(x, attn_mask=mask)
        finally:
            self.transformer.grad_checkpointing = previous
        x = self.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]
        x = (
            x @ self.text_projection
            if not isinstance(self.text_projection, nn.Linear)
            else self.text_projection(x)
        )
        return F.normalize(x.float(), dim=-1)


class PromptEmbedder(LockedCache):
    """Looks up or encodes the N prompts of each class name; thread-safe LRU cache.

    average: one embedding per class instead of N, the unit embeddings of the N filled
    templates averaged and L2-renormalised (ZegCLIP's class embedding); output (K, 1, C).
    """

    def __init__(
        self,
        templates: Sequence[str],
        tower: TextTower | None = None,
        bank: dict[str, torch.Tensor] | None = None,
        cache_size: int = 4096,
        *,
        average: bool = False,
    ) -> None:
        self.templates = tuple(templates)
        self.average = average
        self.tower = tower
        self.bank = dict(bank or {})  # name → (N, C) tensor, kept in its stored dtype
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def can_encode(self) -> bool:
        return self.tower is not None

    def __call__(self, names: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """names: K class names → (K, N, C) float32 embeddings (N = 1 when averaging), in the
        given order."""
        missing = [n for n in dict.fromkeys(names) if n not in self.bank and n not in self._cache]
        if missing:
            if self.tower is None:
                known = ", ".join(list(self.bank)[:8])
                raise UserError(
                    f"no text encoder is loaded, so only the model's stored class names can be "
                    f"used; unknown: {missing[:5]} (known: {known}...)"
                )
            prompts = [p for n in missing for p in fill(self.templates, n)]
            self.tower.check_lengths(prompts)
            chunks = [
                self.tower(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)
            ]
            encoded = torch.cat(chunks).reshape(len(missing), len(self.templates), -1)
            encoded = F.normalize(encoded, dim=-1)
            if self.average:
                encoded = F.normalize(encoded.mean(dim=1, keepdim=True), dim=-1)
            with self._lock:
                for name, emb in zip(missing, encoded.cpu(), strict=True):
                    self._cache[name] = emb
                    self._cache.move_to_end(name)
                while len(self._cache) > max(self._cache_size, len(missing)):
                    self._cache.popitem(last=False)
        with self._lock:
            rows = [self.bank[n] if n in self.bank else self._cache[n] for n in names]
        # fp16 bank rows are promoted to float32 without renormalising, as the original.
        return torch.stack([r.float() for r in rows])

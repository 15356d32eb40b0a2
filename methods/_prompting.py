"""Shared machinery of the prompt-learning methods: virtual tokens and key/value prefixes.

A method builds a *source*: a module with no input that returns one ``(L, width)`` tensor, the
``L = num_virtual_tokens`` prompt rows. `attach` freezes the backbone and hangs a `VirtualPrompt`
on the model (attribute ``virtual_prompt``) that feeds the source's output in one of two routes:

``embeddings`` (width = the input-embedding size): ``L`` placeholder ids are prepended to
    ``input_ids`` and a forward hook on the input-embedding module replaces their embeddings with
    the prompt rows, so the backbone adds its own position (and token-type) embeddings on top, as
    with ``inputs_embeds``. Keeping real ``input_ids`` lets decoder sequence-classification heads
    find the last non-padding token (with ``inputs_embeds`` alone, as Hugging Face PEFT passes
    them, they pool the last position, padding or not). When the caller passes ``inputs_embeds``
    the rows are prepended to them directly. The attention mask gets ``L`` ones in front (virtual
    positions are attended), token-level integer ``labels`` get ``-100`` (never scored),
    ``token_type_ids`` get segment 0, explicit ``position_ids`` get ``0..L-1`` in front and are
    shifted by ``L`` (what the backbone computes itself when they are absent).

``prefix`` (width = ``layers * 2 * kv_heads * head_dim``): the output is laid out as Hugging Face
    PEFT's prefix tuning (``(L, layers*2, kv_heads, head_dim)``; row ``2i`` keys and ``2i+1``
    values of layer ``i``) and passed as ``past_key_values``, a fresh ``transformers.DynamicCache``
    per forward pass, so every self-attention layer sees ``L`` extra keys/values. Grouped-query
    attention is handled by sizing the prefix with the key/value heads, not the attention heads.
    The attention mask gets ``L`` ones in front. Positions: BERT (absolute, from
    ``past_key_values_length``), GPT-2 (absolute, from ``get_seq_length()``) and Llama (rotary,
    from the cache length via ``cache_position``) all start the real tokens at position ``L``
    themselves, as in PEFT and in the P-Tuning v2 code; explicit ``position_ids`` are shifted by
    ``L`` to agree. BERT in this transformers version takes ``past_key_values`` in encoder mode
    too (``BertSelfAttention`` calls ``cache.update`` whenever a cache is given), so no
    projection hooks are needed.

Refused with a clear error: a prefix together with gradient checkpointing (transformers'
``GradientCheckpointingLayer`` silently drops ``past_key_values`` while checkpointing, which
would train without the prefix; the ``embeddings`` route works with it), encoder-decoder models,
4-D attention masks, and a caller-supplied ``past_key_values`` (incremental decoding: the prompt
would be prepended again at every step). So that ``generate(use_cache=False)`` works on either
route, a prefix forward returns no ``past_key_values`` (the cache it built is internal);
`tasks.instruction.greedy_generate` falls back to that when decoding with a cache is refused.

`cache_prompt` is every method's ``merge``: it evaluates the source once (eval mode, no dropout),
stores the result as the buffer ``virtual_prompt.cached`` and deletes the source (embedding,
LSTM, MLP), in place. The returned model is inference-only: it is not the plain architecture (it
keeps the buffer and the hooks), which is why these methods declare ``mergeable = False``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.hookspecs import hookimpl
from harness.plugins import Method
from harness.state import TrainState

ATTR = "virtual_prompt"  # the attribute the prompt module lives under on the task model


@dataclass(frozen=True)
class Dims:
    """What the prompt must be shaped for, read from the model's config."""
    hidden: int          # input-embedding width (virtual token width)
    layers: int
    kv_heads: int        # key/value heads (< attention heads under grouped-query attention)
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def prefix_width(self) -> int:
        return self.layers * 2 * self.kv_dim


def model_dims(model: nn.Module) -> Dims:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return Dims(hidden=model.get_input_embeddings().embedding_dim, layers=text.num_hidden_layers,
                kv_heads=kv_heads, head_dim=head_dim)


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    # Under autocast the projections emit the autocast dtype; the prefix must match it in cat().
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


class VirtualPrompt(nn.Module):
    """Feeds a source's ``(L, width)`` output into the model by the ``embeddings`` or ``prefix`` route."""

    def __init__(self, source: nn.Module, route: str, num_virtual_tokens: int, dims: Dims,
                 placeholder_id: int, dropout: float = 0.0):
        super().__init__()
        if route not in ("embeddings", "prefix"):
            raise ValueError(f"unknown prompt route {route!r}")
        self.source: nn.Module | None = source
        self.register_buffer("cached", None)
        self.route, self.num_virtual_tokens, self.dims = route, num_virtual_tokens, dims
        self.placeholder_id, self.dropout = placeholder_id, dropout
        # Rows waiting for the embedding hook, kept in a dict: assigning a Parameter (prompt
        # tuning's rows are one) to a module attribute would register it as a parameter.
        self._pending: dict[str, torch.Tensor] = {}
        self._arg_names: list[str] = []

    def produce(self) -> torch.Tensor:
        out = self.cached if self.source is None else self.source()
        if out.shape[0] != self.num_virtual_tokens:
            raise RuntimeError(f"prompt source returned {out.shape[0]} rows, expected {self.num_virtual_tokens}")
        return F.dropout(out, self.dropout, self.training) if self.dropout else out

    @torch.no_grad()
    def cache_(self) -> None:
        """Replace the source by its (eval-mode) output, kept as the buffer ``cached``."""
        if self.source is None:
            return
        was = self.training
        self.eval()
        self.cached = self.source().detach().clone()
        self.source = None
        self.train(was)

    # -- hooks --------------------------------------------------------------------------------
    def pre_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        if args:  # bind positional arguments by name, so every input is handled below
            kwargs = {**dict(zip(self._arg_names, args)), **kwargs}
        if kwargs.get("past_key_values") is not None:
            raise NotImplementedError("incremental decoding with a virtual prompt is not supported: "
                                      "the prompt would be prepended again at every step")
        if self.route == "prefix" and model.training and _checkpointing(model):
            raise RuntimeError("a key/value prefix cannot train with gradient checkpointing: "
                               "transformers drops past_key_values in checkpointed layers; disable "
                               "gradient checkpointing (model.gradient_checkpointing_disable())")
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise ValueError("a virtual prompt needs input_ids or inputs_embeds")
        batch, length = ref.shape[:2]
        n, device = self.num_virtual_tokens, ref.device
        prompt = self.produce()

        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if mask.dim() != 2:
            raise ValueError("virtual prompts need a 2-D attention mask (batch, length)")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        pos = kwargs.get("position_ids")

        if self.route == "embeddings":
            if ids is not None:
                kwargs["input_ids"] = torch.cat([ids.new_full((batch, n), self.placeholder_id), ids], dim=1)
                self._pending["rows"] = prompt
            else:
                rows = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
                kwargs["inputs_embeds"] = torch.cat([rows, embeds], dim=1)
            for key, fill in (("token_type_ids", 0), ("labels", -100)):
                v = kwargs.get(key)
                # Only token-level integer tensors grow (sequence labels and float targets do not).
                if v is not None and v.dim() == 2 and v.shape == (batch, length) and not v.is_floating_point():
                    kwargs[key] = torch.cat([v.new_full((batch, n), fill), v], dim=1)
            if pos is not None:
                front = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], n)
                kwargs["position_ids"] = torch.cat([front, pos + n], dim=1)
        else:
            kwargs["past_key_values"] = self._prefix_cache(prompt, batch, model, device)
            if pos is not None:
                kwargs["position_ids"] = pos + n
        return (), kwargs

    def on_embed(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        prompt = self._pending.pop("rows", None)
        if prompt is None:
            return None
        n = self.num_virtual_tokens
        rows = prompt.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([rows, output[:, n:]], dim=1)

    def post_forward(self, model: nn.Module, args: tuple, output: Any) -> Any:
        self._pending.clear()  # never leak rows into a later call that bypasses the pre-hook
        if self.route == "prefix" and getattr(output, "past_key_values", None) is not None:
            # The cache a prefix forward returns is the prefix's own (plus this call's keys and
            # values). Handed back, generate() would feed it to the next step, which a virtual
            # prompt refuses; without it, `generate(use_cache=False)` decodes as the embedding
            # route does, recomputing the whole sequence (with the prefix) every step.
            output.past_key_values = None
        return output

    def _prefix_cache(self, flat: torch.Tensor, batch: int, model: nn.Module, device: torch.device):
        from transformers import DynamicCache

        d, n = self.dims, self.num_virtual_tokens
        dtype = _compute_dtype(device, model.get_input_embeddings().weight.dtype)
        # (L, layers*2*kv_dim) -> (layers*2, kv_heads, L, head_dim), PEFT's layout.
        kv = flat.to(dtype).view(n, d.layers * 2, d.kv_heads, d.head_dim).permute(1, 2, 0, 3)
        cache = DynamicCache(config=model.config)
        for i in range(d.layers):
            cache.update(kv[2 * i].unsqueeze(0).expand(batch, -1, -1, -1),
                         kv[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1), i)
        return cache


def attach(model: nn.Module, source: nn.Module, route: str, num_virtual_tokens: int,
           dropout: float = 0.0) -> VirtualPrompt:
    """Freeze the backbone and wire ``source`` into ``model``; returns the `VirtualPrompt`."""
    if num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be positive, got {num_virtual_tokens}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("prompt methods here support encoder-only and decoder-only models, "
                         "not encoder-decoder ones")
    if hasattr(model, ATTR):
        raise ValueError("the model already carries a virtual prompt")
    if route == "prefix" and _checkpointing(model):
        raise RuntimeError("a key/value prefix cannot train with gradient checkpointing: "
                           "transformers drops past_key_values in checkpointed layers")
    for p in model.parameters():
        p.requires_grad_(False)
    dims = model_dims(model)
    pad = getattr(model.config, "pad_token_id", None)
    vocab = model.get_input_embeddings().num_embeddings
    placeholder = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    vp = VirtualPrompt(source, route, num_virtual_tokens, dims, placeholder, dropout)
    vp.to(model.get_input_embeddings().weight.device)
    setattr(model, ATTR, vp)  # a submodule: its parameters train, move and save with the model
    vp._arg_names = list(inspect.signature(model.forward).parameters)
    # Bound methods of the submodule: a deepcopy of the model re-binds them to the copy.
    model.register_forward_pre_hook(vp.pre_forward, with_kwargs=True)
    model.register_forward_hook(vp.post_forward)
    if route == "embeddings":
        model.get_input_embeddings().register_forward_hook(vp.on_embed)
    return vp


def virtual_prompt(model: nn.Module) -> VirtualPrompt:
    vp = getattr(model, ATTR, None)
    if not isinstance(vp, VirtualPrompt):
        raise ValueError("the model carries no virtual prompt")
    return vp


def cache_prompt(model: nn.Module) -> nn.Module:
    """Every prompt method's merge: keep only the produced prompt/prefix, as a buffer, in place."""
    virtual_prompt(model).cache_()
    return model


class PromptMethod(Method):
    """Base of the four prompt methods: ``make_source`` builds the source, the rest is shared."""

    route: ClassVar[str] = "embeddings"
    mergeable = False

    def make_source(self, model: nn.Module, dims: Dims) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    @hookimpl
    def inject(self, model: nn.Module, ctx: TrainState) -> None:
        n = int(self.params["num_virtual_tokens"])
        if n < 1:
            raise ValueError(f"num_virtual_tokens must be positive, got {n}")
        source = self.make_source(model, model_dims(model))
        vp = attach(model, source, self.route, n, float(self.params.get("dropout", 0.0)))
        ctx.extras["virtual_tokens"] = n
        ctx.extras["prompt_width"] = int(vp.produce().shape[1])

    @hookimpl
    def merge(self, model: nn.Module, ctx: TrainState) -> nn.Module:
        return cache_prompt(model)

    @hookimpl
    def gradient_checkpointing(self, model: nn.Module, ctx: TrainState) -> str | None:
        if self.route == "prefix":  # see the module docstring: the prefix would be dropped
            return "transformers drops past_key_values in checkpointed layers (a key/value prefix)"
        return None


@torch.no_grad()
def _cache_of(model: nn.Module, ids: torch.Tensor) -> Any:
    """The key/value cache of one eval-mode forward over ``ids`` (1-D), or None (encoders give
    none). Eval mode draws no random numbers."""
    was = model.training
    model.eval()
    out = model(input_ids=ids.view(1, -1).to(model.get_input_embeddings().weight.device), use_cache=True)
    model.train(was)
    cache = getattr(out, "past_key_values", None)
    return cache if getattr(cache, "layers", None) else None


def returns_key_value_cache(model: nn.Module) -> bool:
    """Whether a forward pass gives back a key/value cache (decoders do, encoders do not). Asks
    on one token without drawing random numbers, so an encoder's initialisation afterwards is
    what it would have been without the question."""
    return _cache_of(model, torch.zeros(1, dtype=torch.long)) is not None


def prefix_from_tokens(model: nn.Module, ids: torch.Tensor, dims: Dims) -> torch.Tensor:
    """The keys and values the frozen model computes for the tokens ``ids`` (``L``), laid out as a
    prefix source's output ``(L, layers * 2 * kv_dim)`` (Li & Liang's initialisation from the
    activations of real words). Keys are taken as cached, after rotary embedding at positions
    ``0..L-1``: the positions the prefix occupies, since real tokens start at ``L``. Needs a model
    that returns its key/value cache (a decoder); encoders do not."""
    cache = _cache_of(model, ids)
    if cache is None:
        raise ValueError(f"{type(model).__name__} returns no key/value cache, so a prefix cannot be "
                         f"initialised from its activations; use init: random")
    rows = [t for layer in cache.layers for t in (layer.keys, layer.values)]  # 2i keys, 2i+1 values
    kv = torch.stack([t[0] for t in rows])  # (layers*2, kv_heads, L, head_dim)
    if kv.shape != (dims.layers * 2, dims.kv_heads, ids.numel(), dims.head_dim):
        raise ValueError(f"the model's cache has shape {tuple(kv.shape)}, expected "
                         f"{(dims.layers * 2, dims.kv_heads, ids.numel(), dims.head_dim)}")
    return kv.permute(2, 0, 1, 3).reshape(ids.numel(), -1).float().cpu()


# -- sources ----------------------------------------------------------------------------------
class EmbeddingSource(nn.Module):
    """``L`` rows stored directly (prompt tuning; P-Tuning v2's prefix)."""

    def __init__(self, num_virtual_tokens: int, width: int, init: torch.Tensor | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, width)  # PEFT's name: weights copy 1:1
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


"""T5 encoder-decoder in plain PyTorch: the model, sampling with a key/value cache, and
reading/writing HuggingFace checkpoints (config.json + model.safetensors or pytorch_model.bin). T5
(Raffel et al. 2020) is a pre-norm Transformer with four quirks that matter for loading published
weights:
  * RMS norm: y = w * x / sqrt(mean(x^2) + eps), no mean subtraction and no bias;
  * no 1/sqrt(K) in attention (the scale is folded into the initialisation of q);
  * a learned relative position bias, bucketed by key_pos - query_pos, computed once per stack by
    its first block and added to the attention scores of every block (self-attention only);
  * v1.0 (t5-small/base) ties the input and output embeddings and rescales the decoder output by
    D**-0.5 before the LM head; v1.1/FLAN-T5 unties them and uses a gated-GELU feed-forward.
Parameter names are HuggingFace's (encoder.block.0.layer.0.SelfAttention.q.weight, ...): no
renaming.

Shapes: B batch, S source (context) tokens, T target (reply) tokens, L either, D d_model, H heads,
K d_kv, F d_ff, V vocab. Masks are 1 for real tokens and 0 for padding.
"""

import ctypes
import json
import math
import os
import struct
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be loaded; the message names it."""


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512  # D, width of the residual stream
    d_kv: int = 64  # K, width of one attention head (H * K need not equal D)
    d_ff: int = 2048  # F, hidden width of the feed-forward
    num_layers: int = 6  # encoder blocks
    num_decoder_layers: int = None  # decoder blocks; None -> num_layers
    num_heads: int = 8  # H
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # tokens; farther pairs share the last bucket
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5 v1.0) or "gated-gelu" (T5 v1.1, FLAN-T5)
    tie_word_embeddings: bool = True  # v1.0: lm_head is `shared`, and outputs are scaled by D**-0.5
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.feed_forward_proj not in ("relu", "gated-gelu"):
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not "
                "supported: "
                "use 'relu' (T5 v1.0) or 'gated-gelu' (T5 v1.1 / FLAN-T5)"
            )

    @classmethod
    def from_dict(cls, d):
        """Build from a HuggingFace config.json dict; keys that are not fields are ignored."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        # transformers>=5 always writes tie_word_embeddings=true and records the v1.0 rescale as
        # scale_decoder_outputs
        if "scale_decoder_outputs" in d:
            kwargs["tie_word_embeddings"] = d["scale_decoder_outputs"]
        return cls(**kwargs)


class Dropout(nn.Dropout):
    """nn.Dropout (zero with probability p, scale the rest by 1/(1-p); train mode only) whose CPU
    mask comes from torch.rand: CPU bernoulli_ is ~3x slower, and T5 has ~60 dropouts per step
    (elsewhere: F.dropout)."""

    def forward(self, x):
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        return x * torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias. y = w * x / sqrt(mean(x^2) +
    eps)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """Map relative positions n = key_pos - query_pos (any integer tensor) to buckets in [0,
    num_buckets).

    Bidirectional (encoder): buckets [0, nb/2) for keys at or left of the query, [nb/2, nb) for keys
    to its right. Causal (decoder): all nb buckets for n <= 0. In a range of m buckets, distances
    below m/2 get one bucket each; larger ones are binned logarithmically up to max_distance, beyond
    it the last bucket."""
    if bidirectional:
        num_buckets //= 2
        # keys to the right use the upper half
        offset = (relative_position > 0).long() * num_buckets
        n = relative_position.abs()
    else:
        offset = 0
        # distance back in time; future keys are masked anyway
        n = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # log-spaced bins for max_exact <= n < max_distance (clamp(min=1) only avoids log(0) in unused
    # entries)
    log_ratio = torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return offset + torch.where(n < max_exact, n, large)


class Attention(nn.Module):
    """Multi-head attention without the 1/sqrt(K) scale; the position bias arrives inside `mask`."""

    def __init__(self, config, has_relative_bias=False):
        super().__init__()
        self.H = config.num_heads
        self.K = config.d_kv
        self.q = nn.Linear(config.d_model, self.H * self.K, bias=False)
        self.k = nn.Linear(config.d_model, self.H * self.K, bias=False)
        self.v = nn.Linear(config.d_model, self.H * self.K, bias=False)
        self.o = nn.Linear(self.H * self.K, config.d_model, bias=False)
        self.dropout = Dropout(config.dropout_rate)  # on the attention weights
        # only the first block of a stack owns the bias table: one scalar per (bucket, head)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(
                config.relative_attention_num_buckets, self.H
            )

    def heads(self, x):
        B, L, _ = x.shape
        return x.view(B, L, self.H, self.K).transpose(1, 2)  # (B, H, L, K)

    def forward(self, x, mask, source=None, cache=None):
        """x (B, L, D) -> (B, L, D). Self-attention when `source` is None, else cross-attention to
        `source` (B, S, D). `mask`: additive, broadcastable to (B, H, L, L_keys). `cache` (a dict,
        while generating) keeps keys/values: self-attention appends this call's, cross-attention
        computes them once from `source`."""
        q = self.heads(self.q(x))  # (B, H, L, K)
        # cross-attention: computed on the first step
        if source is not None and cache is not None and "k" in cache:
            # (B, H, S, K)
            k = cache["k"]
            v = cache["v"]
        else:
            kv_input = x if source is None else source
            # (B, H, L or S, K)
            k = self.heads(self.k(kv_input))
            v = self.heads(self.v(kv_input))
            if cache is not None:
                # self-attention: append to the past keys/values
                if source is None and "k" in cache:
                    # (B, H, past + L, K)
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"] = k
                cache["v"] = v
        # one written-out path for full passes and cached decoding alike: a sampled token's log-prob
        # is the scored one
        scores = q @ k.transpose(-1, -2)  # (B, H, L, L_keys); no 1/sqrt(K)
        weights = (scores if mask is None else scores + mask).softmax(dim=-1)
        y = self.dropout(weights) @ v  # (B, H, L, K)
        B, _, L, _ = y.shape
        return self.o(y.transpose(1, 2).reshape(B, L, self.H * self.K))  # (B, L, D)


class FeedForward(nn.Module):
    """relu: wo(relu(wi x)) (T5 v1.0); gated-gelu: wo(gelu(wi_0 x) * wi_1 x) (T5 v1.1, FLAN-T5)."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.feed_forward_proj == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, x):
        if self.gated:  # tanh-approximated GELU, as the checkpoints were trained ("gelu_new" in HF)
            h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, L, F)
        else:
            h = F.relu(self.wi(x), inplace=True)  # (B, L, F); in place saves a buffer
        return self.wo(self.dropout(h))  # HF T5 also drops out inside the feed-forward


class T5Block(nn.Module):
    """Self-attention, cross-attention (decoder only), feed-forward; each sublayer is x +
    dropout(f(norm(x))). Sublayers are plain containers in `self.layer`, so that parameter names
    match HF checkpoints: layer.0.SelfAttention, layer.1.EncDecAttention,
    layer.{1|2}.DenseReluDense, each with its layer_norm."""

    def __init__(self, config, is_decoder, has_relative_bias):
        super().__init__()
        self.is_decoder = is_decoder
        self.layer = nn.ModuleList([nn.Module() for _ in range(3 if is_decoder else 2)])
        self.layer[0].SelfAttention = Attention(config, has_relative_bias)
        if is_decoder:
            self.layer[1].EncDecAttention = Attention(config)  # no position bias in cross-attention
        self.layer[-1].DenseReluDense = FeedForward(config)
        for sublayer in self.layer:
            sublayer.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, x, mask, encoder_hidden=None, encoder_mask=None, cache=None):
        attn = self.layer[0]
        ff = self.layer[-1]
        self_cache, cross_cache = (
            (cache["self"], cache["cross"]) if cache is not None else (None, None)
        )
        x = x + self.dropout(attn.SelfAttention(attn.layer_norm(x), mask, cache=self_cache))
        if self.is_decoder:
            cross = self.layer[1]
            x = x + self.dropout(
                cross.EncDecAttention(
                    cross.layer_norm(x), encoder_mask, source=encoder_hidden, cache=cross_cache
                )
            )
        return x + self.dropout(ff.DenseReluDense(ff.layer_norm(x)))


def padding_mask(mask, dtype):
    """1/0 mask (B, L) -> additive float mask (B, 1, 1, L): 0 for real keys, a huge negative for
    padding. finfo.min rather than -inf so that an all-padding row gives a uniform average instead
    of NaN."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention) of T5."""

    def __init__(self, config, is_decoder, embed_tokens):
        super().__init__()
        self.config = config
        self.is_decoder = is_decoder
        # the model's `shared` table, the same module in both stacks
        self.embed_tokens = embed_tokens
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(
            [T5Block(config, is_decoder, has_relative_bias=(i == 0)) for i in range(n)]
        )
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = Dropout(config.dropout_rate)

    def position_bias(self, query_len, key_len, past=0):
        """Relative position bias (1, H, query_len, key_len) for queries at positions
        past..past+query_len-1 and keys at 0..key_len-1 (the decoder's includes the causal mask;
        cached decoding asks for one row)."""
        cfg = self.config
        device = self.embed_tokens.weight.device
        query_pos = torch.arange(past, past + query_len, device=device)[:, None]
        key_pos = torch.arange(key_len, device=device)[None, :]
        # (query_len, key_len)
        buckets = relative_position_bucket(
            key_pos - query_pos,
            not self.is_decoder,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        )
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, query_len, key_len)
        if self.is_decoder:  # a query may not look at later keys
            bias = bias.masked_fill(key_pos > query_pos, torch.finfo(bias.dtype).min)
        return bias

    def forward(
        self, input_ids, attention_mask=None, encoder_hidden=None, encoder_mask=None, cache=None
    ):
        """input_ids (B, L) -> hidden states (B, L, D). attention_mask (B, L) masks padded keys in
        self-attention, encoder_mask (B, S) padded sources in cross-attention. With `cache` (one
        dict per block, see T5.generate) input_ids holds only the new tokens."""
        B, L = input_ids.shape
        past = cache[0]["self"]["k"].shape[2] if cache and "k" in cache[0]["self"] else 0
        x = self.dropout(self.embed_tokens(input_ids))  # (B, L, D); no sqrt(D) scaling in T5
        # (1, H, L, past + L), shared by all blocks
        mask = self.position_bias(L, past + L, past).to(x.dtype)
        if attention_mask is not None:
            mask = mask + padding_mask(attention_mask, x.dtype)  # (B, H, L, past + L)
        # (B, 1, 1, S)
        cross_mask = padding_mask(encoder_mask, x.dtype) if encoder_mask is not None else None
        for i, block in enumerate(self.block):
            x = block(x, mask, encoder_hidden, cross_mask, cache=cache[i] if cache else None)
        return self.dropout(self.final_layer_norm(x))


@torch.no_grad()
def init_weights(module, config):
    """HF's T5 initialisation (factor 1) of a T5 or one of its stacks, by parameter name: every std
    is 1/sqrt(fan_in), except q, which also absorbs the missing 1/sqrt(K) of the attention scores,
    and the shared embedding and LM head, which are N(0, 1)."""
    D = config.d_model
    K = config.d_kv
    H = config.num_heads
    Fd = config.d_ff
    for name, p in module.named_parameters():
        leaf = name.split(".")[-2]
        if leaf in ("shared", "lm_head"):
            nn.init.normal_(p, std=1.0)
        elif leaf in ("layer_norm", "final_layer_norm"):
            nn.init.ones_(p)
        else:
            nn.init.normal_(
                p,
                std={"q": (D * K) ** -0.5, "o": (H * K) ** -0.5, "wo": Fd**-0.5}.get(leaf, D**-0.5),
            )


# Names under which checkpoints store copies of shared.weight (each must equal it), and a key T5
# never uses.
TIED_KEYS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# cross-attn has no bias
UNUSED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


class T5(nn.Module):
    """T5 for conditional generation: shared embedding, encoder, decoder, LM head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False, embed_tokens=self.shared)
        self.decoder = T5Stack(config, is_decoder=True, embed_tokens=self.shared)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config)
        if config.tie_word_embeddings:  # v1.0: the output projection is the input embedding table
            self.lm_head.weight = self.shared.weight

    def shift_right(self, ids):
        """Teacher-forcing decoder inputs: (B, T) -> (B, T) with the start token prepended and the
        last dropped."""
        start = torch.full_like(ids[:, :1], self.config.decoder_start_token_id)
        return torch.cat([start, ids[:, :-1]], dim=1)  # (B, T)

    def decoder_states(self, input_ids, attention_mask, decoder_input_ids):
        """Final decoder states (B, T, D) for decoder_input_ids (B, T) given the source (B, S) and
        its mask."""
        encoder_hidden = self.encoder(input_ids, attention_mask)  # (B, S, D)
        return self.decoder(
            decoder_input_ids, encoder_hidden=encoder_hidden, encoder_mask=attention_mask
        )

    def lm_logits(self, decoder_hidden):
        """Logits (B, T, V) from a float32 matmul, autocast or not: sampling, scoring and the losses
        read them."""
        device_type = decoder_hidden.device.type
        no_autocast = nullcontext()  # the meta device (shapes only) has no autocast to turn off
        if torch.amp.is_autocast_available(device_type):
            no_autocast = torch.autocast(device_type, enabled=False)
        with no_autocast:
            decoder_hidden = decoder_hidden.float()
            # the tied table is N(0, 1)-scaled: back to logit scale
            if self.config.tie_word_embeddings:
                decoder_hidden = decoder_hidden * self.config.d_model**-0.5
            return self.lm_head(decoder_hidden)  # (B, T, V)

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        """Logits (B, T, V) for decoder_input_ids (B, T) (e.g. shift_right(labels)) given the source
        (B, S)."""
        return self.lm_logits(self.decoder_states(input_ids, attention_mask, decoder_input_ids))

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask=None,
        max_new_tokens=30,
        do_sample=False,
        temperature=1.0,
        top_k=0,
        min_new_tokens=0,
        generator=None,
    ):
        """New token ids (B, <= max_new_tokens), without the start token, pad after each row's EOS.

        Greedy when do_sample=False; otherwise samples from softmax(logits / temperature) restricted
        to the top_k tokens (0 = all). EOS is forbidden for the first min_new_tokens steps. Dropout
        follows the module's mode (call .eval() first). One decoder token per step, with a key/value
        cache."""
        cfg = self.config
        encoder_hidden = self.encoder(input_ids, attention_mask)  # (B, S, D)
        cache = [{"self": {}, "cross": {}} for _ in self.decoder.block]
        token = torch.full_like(input_ids[:, :1], cfg.decoder_start_token_id)  # (B, 1)
        finished = torch.zeros_like(token[:, 0], dtype=torch.bool)  # (B,)
        out = [token[:, :0]]  # (B, 0), so that max_new_tokens=0 returns an empty (B, 0) tensor
        for step in range(max_new_tokens):
            hidden = self.decoder(
                token, encoder_hidden=encoder_hidden, encoder_mask=attention_mask, cache=cache
            )
            logits = self.lm_logits(hidden[:, -1])  # (B, V), float32
            if step < min_new_tokens:
                logits[:, cfg.eos_token_id] = float("-inf")
            token = sample_next(logits, do_sample, temperature, top_k, generator)[:, None]  # (B, 1)
            # finished rows only emit padding
            token = token.masked_fill(finished[:, None], cfg.pad_token_id)
            out.append(token)
            finished |= token[:, 0] == cfg.eos_token_id
            if finished.all():
                break
        return torch.cat(out, dim=1)  # (B, steps)

    @classmethod
    def from_pretrained(cls, path):
        """Load a HF T5 directory (config.json + model.safetensors or pytorch_model.bin), in eval
        mode. Fails loudly: every checkpoint key used once (or a tied copy / known unused name),
        every parameter filled."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path}: no config.json; expected a HuggingFace T5 directory "
                "(config.json + model.safetensors or pytorch_model.bin)"
            )
        try:
            raw = json.loads((path / "config.json").read_text())
            config = T5Config.from_dict(raw)
        except (UnicodeDecodeError, TypeError, ValueError) as e:  # ValueError: JSONDecodeError too
            raise CheckpointError(f"{path / 'config.json'}: not a T5 config ({e})") from None
        if (path / "model.safetensors").is_file():
            state = load_safetensors(path / "model.safetensors")
        elif (path / "pytorch_model.bin").is_file():
            try:  # weights_only: a .bin is a pickle, and a full unpickle would run arbitrary code
                state = torch.load(
                    path / "pytorch_model.bin", map_location="cpu", weights_only=True
                )
            except Exception as e:
                raise CheckpointError(
                    f"{path / 'pytorch_model.bin'}: cannot be read as a state dict ({e})"
                ) from None
        else:
            raise CheckpointError(
                f"{path}: neither model.safetensors nor pytorch_model.bin found "
                "(sharded checkpoints are not supported)"
            )
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise CheckpointError(
                f"{path}: the weights file does not hold a flat {{name: tensor}} dict"
            )
        model = cls(config)
        # one embedding table, stored under up to four names (some files keep it only under a
        # stack's name)
        shared = next((state[k] for k in ("shared.weight",) + TIED_KEYS if k in state), None)
        if (
            not config.tie_word_embeddings
            and "lm_head.weight" not in state
            and raw.get("tie_word_embeddings")
        ):
            # transformers>=5 omits lm_head.weight when it equals shared.weight
            state["lm_head.weight"] = shared
        tied = (
            ("shared.weight",)
            + TIED_KEYS
            + (("lm_head.weight",) if config.tie_word_embeddings else ())
        )
        differ = [k for k in tied if k in state and not torch.equal(state[k], shared)]
        if differ:
            raise CheckpointError(
                f"{path}: {differ} differ from shared.weight, but this T5 has "
                "one embedding table "
                "for encoder and decoder (and, with tie_word_embeddings, the "
                "LM head)"
            )
        state = {k: v for k, v in state.items() if k not in UNUSED_KEYS}
        if shared is not None:
            # every name model.state_dict() lists for the shared table
            state.update({k: shared for k in tied})
        # strict: every key used, every parameter filled, shapes equal; fp16/bf16 are cast to fp32
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: checkpoint does not match config.json: {e}") from None
        return model.eval()

    def save_pretrained(self, path):
        """Write config.json + model.safetensors that both T5.from_pretrained and transformers can
        load."""
        path = Path(path)
        config = {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            **asdict(self.config),
            "is_gated_act": self.config.feed_forward_proj == "gated-gelu",
        }
        # named_parameters() skips the tied lm_head.weight, exactly as HF's own files do
        tensors = {k: p.detach() for k, p in self.named_parameters()}
        save_safetensors(tensors, path / "model.safetensors", metadata={"format": "pt"})
        atomic_write(path / "config.json", [json.dumps(config, indent=2).encode()])


def sample_next(logits, do_sample, temperature, top_k, generator=None):
    """Next token ids (B,) from logits (B, V): argmax, or a sample after temperature and top-k. A
    sample inverts the CDF of the kept tokens with one uniform per row (multinomial draws one per
    vocabulary entry: ~30x slower)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    # None: candidates are the whole vocabulary, in id order
    logits = logits / temperature
    token_ids = None
    if top_k > 0:  # keep the k largest logits
        logits, token_ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # (B, k)
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)  # (B, n), unnormalised
    u = (
        torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
        * cdf[:, -1:]
    )
    # (B, 1): first cdf > u
    choice = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)
    return (choice if token_ids is None else token_ids.gather(-1, choice))[:, 0]


# ------------------------------------------------------------------------------------ safetensors
# the format: 8-byte little-endian header length N, N bytes of JSON header, raw little-endian data
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_safetensors(path):
    """Read a .safetensors file into {name: tensor}; any malformation raises CheckpointError."""
    data = bytearray(Path(path).read_bytes())  # writable, so torch.frombuffer can share it
    if len(data) < 8:
        raise CheckpointError(
            f"{path}: {len(data)} bytes, too short for a safetensors file (truncated?)"
        )
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise CheckpointError(
            f"{path}: header length {n} runs past the end of the {len(data)}-byte file (truncated?)"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: header is a JSON {type(header).__name__}, expected an object"
        )
    buffer = memoryview(data)[8 + n :]  # the byte buffer that data_offsets index into
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
            raise CheckpointError(
                f"{path}: tensor {name!r} has a bad header entry {info!r} "
                f"(known dtypes: {sorted(SAFETENSORS_DTYPES)})"
            ) from None
        nbytes = math.prod(shape) * dtype.itemsize
        # dims must fit int64 too: an empty tensor (a 0 dim) passes the size check with any other
        # dim
        if (
            not all(0 <= d < 2**63 for d in shape)
            or not 0 <= begin <= end <= len(buffer)
            or end - begin != nbytes
        ):
            raise CheckpointError(
                f"{path}: tensor {name!r} (shape {shape}, {info['dtype']}) has "
                "data_offsets "
                f"[{begin}, {end}] outside the {len(buffer)}-byte buffer or of "
                "the wrong size"
            )
        raw = (
            torch.frombuffer(buffer[begin:end], dtype=torch.uint8)
            if nbytes
            else torch.empty(0, dtype=torch.uint8)
        )
        # clone: own memory, independent of `data`
        tensors[name] = raw.view(dtype).reshape(shape).clone()
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a .safetensors file, atomically (see atomic_write)."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        chunks.append(ctypes.string_at(t.data_ptr(), nbytes))  # the tensor's raw bytes
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad the header so the tensor data starts 8-byte aligned
    atomic_write(path, [struct.pack("<Q", len(blob)), blob] + chunks)


def atomic_write(path, data):
    """Write bytes (or a list of byte chunks) to a temp file in the same folder, fsync it, then
    rename it over `path`: a crash leaves the old file or the new one, never half of one. Every file
    of a run goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a killed writer's is removed by rundir.hold
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    # the umask decides the mode, as with open()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            # a full disk names no file: name the one being written
            e.filename = e.filename or str(path)
        raise

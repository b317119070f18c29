"""Grader for solutions|exercises/03_attention_exercises.ipynb.

Part A (the attention layer, piece by piece) is compared with `zer02llm.attention` (the package's weights copied into
the learner's layer), PyTorch's `F.scaled_dot_product_attention` and Hugging Face's `repeat_kv`. When a wrong answer
equals what a typical slip produces - a softmax over the queries, no 1/sqrt(d), a mask off by one, key/value heads in
the wrong order, a cache written at the wrong position, RoPE rows not offset while decoding - the message names the
slip. Part B: sliding-window attention, ALiBi, attention sinks.
"""
import math
import traceback
from typing import Callable

import torch
import torch.nn.functional as F

from grading import Mistakes, NotebookRun, assert_close, call, name_the_mistake, same
from zer02llm.attention import Attention, KVCache, causal_mask
from zer02llm.rope import apply_rope, precompute_rope

NOTEBOOK = "03_attention_exercises.ipynb"


# --- A1: scaled dot-product attention ---------------------------------------------------------------------------------

def _attend(q, k, v, mask=None, softmax_dim: int = -1, scale: str = "sqrt", mask_use: str = "fill") -> torch.Tensor:
    """softmax(q kᵀ/√d) v in float64 with a bool mask (True = may attend); the knobs reproduce typical slips."""
    q, k, v = q.double(), k.double(), v.double()
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / {"sqrt": math.sqrt(d), "none": 1.0, "d": d}[scale]
    if mask is not None and mask_use == "fill":
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None and mask_use == "inverted":
        scores = scores.masked_fill(mask, float("-inf"))
    elif mask is not None and mask_use == "multiplied":
        scores = scores * mask
    return (scores.softmax(dim=softmax_dim) @ v).float()


SOFTMAX_SLIP = ("softmax over the wrong dimension: the weights of one query must sum to 1 over the keys (the last "
                "dimension, softmax(dim=-1)); yours normalise over the queries")
SCALE_SLIP = ("the scores are not divided by sqrt(d): q·k has standard deviation about sqrt(d), so unscaled scores "
              "make the softmax nearly one-hot and its gradients vanish")


def _attention_slips(q, k, v, mask) -> Mistakes:
    slips = [
        (SOFTMAX_SLIP, lambda: _attend(q, k, v, mask, softmax_dim=-2)),
        (SCALE_SLIP, lambda: _attend(q, k, v, mask, scale="none")),
        ("the scores are divided by d instead of sqrt(d) (the standard deviation of q·k is sqrt(d))",
         lambda: _attend(q, k, v, mask, scale="d")),
    ]
    if mask is not None:
        slips += [
            ("the mask is inverted: True means 'may attend', so fill -inf where the mask is False (~mask)",
             lambda: _attend(q, k, v, mask, mask_use="inverted")),
            ("the mask is ignored: keys where it is False must get exactly zero weight",
             lambda: _attend(q, k, v, None)),
            ("the mask multiplies the scores: a masked key then has score 0, and e^0 is not 0 - fill the masked scores "
             "with -inf instead", lambda: _attend(q, k, v, mask, mask_use="multiplied")),
        ]
    return slips


def check_scaled_dot_product(run: NotebookRun):
    """Against PyTorch's F.scaled_dot_product_attention, which takes the same boolean mask convention."""
    g = torch.Generator().manual_seed(1)
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    cases = (  # (B, H, T, S, d, mask)
        (2, 3, 5, 5, 8, torch.ones(5, 5, dtype=torch.bool).tril()),
        (1, 2, 3, 7, 16, causal_mask(3, 7)),
        (2, 2, 7, 7, 8, causal_mask(7, 7, padding_mask=pad)),
        (2, 4, 4, 6, 8, None),
        (1, 2, 1, 6, 4, None),
    )
    for B, H, T, S, d, mask in cases:
        q = torch.randn(B, H, T, d, generator=g)
        k, v = torch.randn(B, H, S, d, generator=g), torch.randn(B, H, S, d, generator=g)
        mask_shape = None if mask is None else tuple(mask.shape)
        what = f"scaled_dot_product(q {tuple(q.shape)}, k {tuple(k.shape)}, mask {mask_shape})"
        got = call(run, "scaled_dot_product", q, k, v, mask)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        name_the_mistake(what, got, want, _attention_slips(q, k, v, mask))
        assert_close(got, want, f"{what} vs F.scaled_dot_product_attention")


# --- A2: the causal and padding mask ----------------------------------------------------------------------------------

def _mask(q_len: int, kv_len: int, padding_mask: torch.Tensor | None = None, see_ahead: int = 0, top_left: bool = False,
          sees_itself: bool = True, pad_queries: bool = False) -> torch.Tensor:
    """The mask written out, in the package's shape; the defaults are right and each knob is one typical slip."""
    q_pos = torch.arange(q_len)[:, None] + (0 if top_left else kv_len - q_len)
    k_pos = torch.arange(kv_len)[None, :]
    mask = (k_pos <= q_pos + see_ahead)[None, None]
    if padding_mask is None:
        return mask
    real = padding_mask.bool()
    if pad_queries:
        return mask & real[:, -q_len:, None][:, None]
    itself = (k_pos == q_pos) if sees_itself else torch.zeros((), dtype=torch.bool)
    return mask & (real[:, None, None, :] | itself)


DIAGONAL_SLIP = ("the causal mask excludes the diagonal: a query must see its own key (key position <= query position, "
                 "not <); otherwise the first token sees nothing at all and its softmax is NaN")
FUTURE_SLIP = ("the causal mask is off by one into the future: each query also sees the next token's key (it must see "
               "key positions <= its own position, no more)")
MASK_SLIPS = [  # (the slip, the knobs of _mask that reproduce it)
    (DIAGONAL_SLIP, dict(see_ahead=-1)),
    (FUTURE_SLIP, dict(see_ahead=1)),
    ("the triangle is aligned top-left: the queries are the newest q_len tokens, at positions kv_len - q_len .. "
     "kv_len - 1, not 0 .. q_len - 1 (it shows as soon as a cache holds earlier tokens)", dict(top_left=True)),
    ("padding queries see nothing: their rows are all False, a softmax of only -inf (NaN); let every token see "
     "itself, (key == query) | real key", dict(sees_itself=False)),
    ("the padding hides queries (rows) instead of keys (columns): padding_mask describes the keys, so it broadcasts "
     "as padding_mask[:, None, None, :]", dict(pad_queries=True)),
]


def _naive_mask(q_len: int, kv_len: int, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Entry by entry, from the rules: no future key, no padding key, always itself."""
    B = 1 if padding_mask is None else padding_mask.shape[0]
    want = torch.zeros(B, 1, q_len, kv_len, dtype=torch.bool)
    for b in range(B):
        for i in range(q_len):
            p = kv_len - q_len + i
            for j in range(p + 1):
                want[b, 0, i, j] = j == p or padding_mask is None or bool(padding_mask[b, j])
    return want


def check_causal_padding_mask(run: NotebookRun):
    """Against zer02llm.attention.causal_mask and an entry-by-entry reference."""
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]])
    cases = ((6, 6, None), (3, 8, None), (1, 5, None), (8, 8, pad), (3, 8, pad), (1, 8, pad.bool()))
    for q_len, kv_len, padding in cases:
        what = f"causal_padding_mask({q_len}, {kv_len}{'' if padding is None else ', padding_mask'})"
        got = call(run, "causal_padding_mask", q_len, kv_len, padding)
        want = causal_mask(q_len, kv_len, padding_mask=padding)
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            raise AssertionError(f"{what} should be a bool tensor (True = may attend), got {type(got).__name__} "
                                 f"{getattr(got, 'dtype', '')}")
        if padding is not None and got.shape == (1, 1, q_len, kv_len):
            raise AssertionError(f"{what}: shape {tuple(got.shape)} ignores the padding; with a padding_mask of "
                                 f"{padding.shape[0]} sequences the mask is {tuple(want.shape)}")
        if got.shape != want.shape:
            raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)} (batch or 1, one "
                                 "mask shared by every head, queries, keys)")
        slips = [(slip, lambda knobs=knobs: _mask(q_len, kv_len, padding, **knobs)) for slip, knobs in MASK_SLIPS]
        name_the_mistake(what, got, want, slips)
        for name, reference in (("zer02llm.attention.causal_mask", want),
                                ("the rules entry by entry", _naive_mask(q_len, kv_len, padding))):
            if not torch.equal(got, reference):
                b, _, i, j = (int(t) for t in torch.nonzero(got != reference)[0])
                p = kv_len - q_len + i
                kind = "itself" if j == p else "padding" if padding is not None and not padding[b, j] else "a real key"
                raise AssertionError(f"{what} vs {name}: [{b}, 0, {i}, {j}] is {bool(got[b, 0, i, j])}; query {i} sits "
                                     f"at position {p}, key {j} is {'in the future' if j > p else kind}")


# --- A3: sharing key/value heads --------------------------------------------------------------------------------------

KV_ORDER_SLIP = ("key/value heads repeated in the wrong order: query head h must use key/value head h // n_rep "
                 "(consecutive query heads share one, as torch.repeat_interleave and Hugging Face's repeat_kv do); "
                 "yours gives it head h % n_kv_heads (torch.repeat tiles the heads)")


def check_repeat_kv(run: NotebookRun):
    """Against Hugging Face's repeat_kv and torch.repeat_interleave."""
    from transformers.models.llama.modeling_llama import repeat_kv

    g = torch.Generator().manual_seed(2)
    for shape, n_rep in (((2, 2, 5, 4), 3), ((1, 4, 3, 8), 2), ((1, 1, 6, 4), 4), ((2, 3, 2, 4), 1)):
        x = torch.randn(*shape, generator=g)
        what = f"repeat_kv(x {shape}, n_rep={n_rep})"
        got = call(run, "repeat_kv", x, n_rep)
        B, H, S, d = shape
        if isinstance(got, torch.Tensor) and got.shape == (B, H, S * n_rep, d) and n_rep > 1:
            raise AssertionError(f"{what}: shape {tuple(got.shape)} repeats the positions (dim 2); the heads (dim 1) "
                                 f"must be repeated, giving {(B, H * n_rep, S, d)}")
        name_the_mistake(what, got, repeat_kv(x, n_rep), [(KV_ORDER_SLIP, lambda: x.repeat(1, n_rep, 1, 1))])
        assert_close(got, repeat_kv(x, n_rep), f"{what} vs transformers' repeat_kv")
        assert_close(got, x.repeat_interleave(n_rep, dim=1), f"{what} vs torch.repeat_interleave")


# --- A4: the KV cache -------------------------------------------------------------------------------------------------

def _cache_update(cache, start_pos: int, k: torch.Tensor, v: torch.Tensor, what: str):
    """The learner's cache.update; an exception becomes a message that says which call raised it."""
    __tracebackhide__ = True
    try:
        result = cache.update(start_pos, k, v)
    except NotImplementedError:
        raise AssertionError("`KVCache.update` is not implemented yet: replace `raise NotImplementedError()` in its "
                             "cell") from None
    except Exception as e:
        raise AssertionError(f"{what} raised {type(e).__name__}: {e}") from e
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError(f"{what} should return a tuple (keys, values)")
    return result


def _written_at(chunks: list[torch.Tensor], max_len: int, where: Callable[[int], int]) -> list[torch.Tensor]:
    """What update returns after each chunk when chunk n is written at where(start_pos) (right: the identity)."""
    buffer, returned, pos = torch.zeros(*chunks[0].shape[:2], max_len, chunks[0].shape[3]), [], 0
    for chunk in chunks:
        at = where(pos)
        buffer[:, :, at:at + chunk.shape[2]] = chunk
        pos += chunk.shape[2]
        returned.append(buffer[:, :, :pos].clone())
    return returned


def check_kv_cache(run: NotebookRun):
    """Chunks of 3, 1, 1 and 2 tokens, against what was written; views of buffers allocated once; overflow refused."""
    B, H, max_len, d = 2, 3, 9, 4  # 7 tokens in a cache of 9: room to see a cache that writes too far
    g = torch.Generator().manual_seed(3)
    keys = [torch.randn(B, H, n, d, generator=g) for n in (3, 1, 1, 2)]
    values = [torch.randn(B, H, n, d, generator=g) for n in (3, 1, 1, 2)]
    cache = call(run, "KVCache", B, H, max_len, d)
    for name in ("k", "v"):
        buffer = getattr(cache, name, None)
        if not isinstance(buffer, torch.Tensor) or buffer.shape != (B, H, max_len, d):
            raise AssertionError(f"KVCache({B}, {H}, {max_len}, {d}).{name} should be a buffer of shape "
                                 f"{(B, H, max_len, d)} allocated in __init__, got {type(buffer).__name__} "
                                 f"{tuple(getattr(buffer, 'shape', ()))}")
    slips = {"written one position too far (at start_pos + 1): the new tokens belong at positions start_pos .. "
             "start_pos + T - 1": _written_at(keys, max_len, lambda p: p + 1),
             "written at position 0 every time, whatever start_pos says: the new tokens belong at positions "
             "start_pos .. start_pos + T - 1": _written_at(keys, max_len, lambda p: 0)}
    pos = 0
    for step, (k, v) in enumerate(zip(keys, values)):
        n = k.shape[2]
        what = f"update({pos}, k, v) with {n} new position{'s' if n > 1 else ''} after {pos}"
        got_k, got_v = _cache_update(cache, pos, k, v, what)
        pos += n
        if isinstance(got_k, torch.Tensor) and got_k.shape[2:3] == (n,) and n != pos:
            raise AssertionError(f"{what}: returned only the new position{'s' if n > 1 else ''}; attention needs "
                                 f"the keys and values of all positions so far, 0 .. {pos - 1}")
        if isinstance(got_k, torch.Tensor) and got_k.shape[2:3] == (max_len,):
            raise AssertionError(f"{what}: returned all {max_len} positions of the buffer, unwritten zeros included; "
                                 f"return positions 0 .. {pos - 1}")
        want_k, want_v = torch.cat(keys[:step + 1], dim=2), torch.cat(values[:step + 1], dim=2)
        name_the_mistake(f"{what}: keys", got_k, want_k, [(slip, lambda r=r: r[step]) for slip, r in slips.items()])
        assert_close(got_k, want_k, f"{what}: keys")
        assert_close(got_v, want_v, f"{what}: values")
        if got_k.untyped_storage().data_ptr() != cache.k.untyped_storage().data_ptr():
            raise AssertionError(f"{what}: the keys returned are a copy; return views of the buffers "
                                 "(self.k[:, :, :end]) - copying the cache at every step is the quadratic cost it "
                                 "exists to avoid")
    small = call(run, "KVCache", 1, 1, 4, 2)
    _cache_update(small, 0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), "update(0, ...) of 3 positions")
    try:
        small.update(3, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    except ValueError:
        return
    except Exception as e:
        raise AssertionError(f"update(3, ...) of 2 positions into a cache of 4 raised {type(e).__name__} ({e}); "
                             "raise a ValueError that says the positions do not fit") from None
    raise AssertionError("update(3, ...) of 2 positions into a cache of 4 positions did not fail: raise a ValueError "
                         "that says the positions do not fit")


# --- A5: the attention layer ------------------------------------------------------------------------------------------

LAYERS = ((32, 4, 4), (32, 4, 2), (48, 6, 1))  # (dim, n_heads, n_kv_heads): MHA, GQA, MQA, head_dim 8
COS, SIN = precompute_rope(8, 16, theta=1e4)  # the whole tables, as the learner's layer receives them


def _layers(run: NotebookRun, dim: int, n_heads: int, n_kv_heads: int, seed: int) -> tuple[Attention, torch.nn.Module]:
    """The package's layer and the learner's, with the package's (seeded) weights copied into the learner's."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        reference = Attention(dim, n_heads, n_kv_heads).eval()
    mine = call(run, "CausalSelfAttention", dim, n_heads, n_kv_heads)
    if not isinstance(mine, torch.nn.Module):
        raise AssertionError(f"CausalSelfAttention should be an nn.Module, got {type(mine).__name__}")
    try:
        mine.load_state_dict(reference.state_dict())
    except RuntimeError as e:
        raise AssertionError(f"CausalSelfAttention({dim}, {n_heads}, {n_kv_heads}) should hold exactly q_proj, "
                             "k_proj, v_proj and o_proj, nn.Linear without bias shaped like the chapter's Attention: "
                             f"{e}") from None
    return reference, mine.eval()


def _forward(layer: torch.nn.Module, what: str, *args, **kwargs) -> torch.Tensor:
    """The learner's forward without autograd; an exception becomes a message that names the call."""
    __tracebackhide__ = True
    try:
        with torch.no_grad():
            return layer(*args, **kwargs)
    except NotImplementedError as e:
        unfinished = traceback.extract_tb(e.__traceback__)[-1].name  # forward itself, or a piece it calls
        where = "`CausalSelfAttention.forward`" if unfinished == "forward" else (
            f"`{unfinished}`, which CausalSelfAttention.forward calls,")
        raise AssertionError(f"{where} is not implemented yet: replace `raise NotImplementedError()` in its "
                             "cell") from None
    except Exception as e:
        raise AssertionError(f"{what}: CausalSelfAttention raised {type(e).__name__}: {e}") from e


def _explicit(ref: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
              kv_order: str = "consecutive", split_transposed: bool = True, merged_transposed: bool = True,
              **attend_knobs) -> torch.Tensor:
    """`ref`'s layer written out in float64 for the rows cos/sin of these positions; knobs reproduce typical slips."""
    B, T, _ = x.shape
    H, H_kv, d = ref.n_heads, ref.n_kv_heads, ref.head_dim

    def heads(proj: torch.nn.Linear, n: int) -> torch.Tensor:
        y = x.double() @ proj.weight.double().T
        return y.view(B, T, n, d).transpose(1, 2) if split_transposed else y.view(B, n, T, d)

    q, k, v = heads(ref.q_proj, H), heads(ref.k_proj, H_kv), heads(ref.v_proj, H_kv)
    q, k = apply_rope(q, cos.double(), sin.double()), apply_rope(k, cos.double(), sin.double())
    group = torch.arange(H) // (H // H_kv) if kv_order == "consecutive" else torch.arange(H) % H_kv
    y = _attend(q, k[:, group], v[:, group], mask, **attend_knobs).double()
    y = y.transpose(1, 2).reshape(B, T, -1) if merged_transposed else y.reshape(B, T, -1)
    return (y @ ref.o_proj.weight.double().T).float()


def _layer_slips(ref: Attention, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> Mistakes:
    """Mistakes of a layer's forward over positions 0..T-1."""
    T = x.shape[1]
    cos, sin, mask = COS[:T], SIN[:T], _mask(T, T, padding_mask)

    def slip(mask_knobs: dict | None = None, **knobs) -> Callable[[], torch.Tensor]:
        return lambda: _explicit(ref, x, cos, sin, _mask(T, T, padding_mask, **(mask_knobs or {})), **knobs)

    slips = [
        (KV_ORDER_SLIP, slip(kv_order="tiled")),
        (SOFTMAX_SLIP, slip(softmax_dim=-2)),
        (SCALE_SLIP, slip(scale="none")),
        (DIAGONAL_SLIP, slip(dict(see_ahead=-1))),
        (FUTURE_SLIP, slip(dict(see_ahead=1))),
        ("heads split without a transpose: view the projection as (B, T, heads, head_dim), then transpose to "
         "(B, heads, T, head_dim); viewing it directly as (B, heads, T, head_dim) mixes positions and heads",
         slip(split_transposed=False)),
        ("heads merged without a transpose: y (B, heads, T, head_dim) must become (B, T, heads, head_dim) before the "
         "reshape to (B, T, dim); reshaping it directly mixes positions and heads", slip(merged_transposed=False)),
    ]
    if padding_mask is not None:
        slips.append(("the padding is ignored: pass padding_mask on to causal_padding_mask, so that no query sees a "
                      "padding key", lambda: _explicit(ref, x, cos, sin, _mask(T, T))))
        slips += [(name, slip(knobs)) for name, knobs in MASK_SLIPS[2:]]
    return slips


def _sdpa_reference(ref: Attention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The layer through PyTorch's fused attention (causal unless a mask is given), GQA by enable_gqa."""
    B, T, _ = x.shape

    def heads(proj: torch.nn.Linear, n: int) -> torch.Tensor:
        return proj(x).view(B, T, n, ref.head_dim).transpose(1, 2)

    q, k, v = heads(ref.q_proj, ref.n_heads), heads(ref.k_proj, ref.n_kv_heads), heads(ref.v_proj, ref.n_kv_heads)
    q, k = apply_rope(q, COS[:T], SIN[:T]), apply_rope(k, COS[:T], SIN[:T])
    with torch.no_grad():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return ref.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def check_attention_layer(run: NotebookRun):
    """MHA, GQA and MQA over 7 tokens: against the package's Attention (same weights) and PyTorch's fused attention."""
    g = torch.Generator().manual_seed(4)
    for seed, (dim, n_heads, n_kv_heads) in enumerate(LAYERS):
        ref, mine = _layers(run, dim, n_heads, n_kv_heads, seed)
        x = torch.randn(2, 7, dim, generator=g)
        what = f"CausalSelfAttention({dim}, n_heads={n_heads}, n_kv_heads={n_kv_heads}) on x {tuple(x.shape)}"
        got = _forward(mine, what, x, COS, SIN)
        with torch.no_grad():
            want = ref(x, COS[:7], SIN[:7])
        name_the_mistake(what, got, want, _layer_slips(ref, x))
        assert_close(got, want, f"{what} vs zer02llm.attention.Attention (same weights)")
        assert_close(got, _sdpa_reference(ref, x), f"{what} vs F.scaled_dot_product_attention")


def check_attention_padding(run: NotebookRun):
    """A left-padded batch, then two decoding steps: against the package with causal_mask(..., padding_mask)."""
    g = torch.Generator().manual_seed(5)
    ref, mine = _layers(run, 32, 4, 2, seed=10)
    pad = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    x = torch.randn(2, 7, 32, generator=g)  # the padding holds random vectors: what sits there must not matter
    what = "CausalSelfAttention(32, 4, 2) on a batch left-padded by 0 and 3 tokens"
    got = _forward(mine, what, x, COS, SIN, padding_mask=pad)
    with torch.no_grad():
        want = ref(x, COS[:7], SIN[:7], attn_mask=causal_mask(7, 7, padding_mask=pad))
    name_the_mistake(what, got, want, _layer_slips(ref, x, pad))
    assert_close(got, want, f"{what} vs zer02llm.attention.Attention with causal_mask(7, 7, padding_mask)")
    assert_close(got, _sdpa_reference(ref, x, causal_mask(7, 7, padding_mask=pad)),
                 f"{what} vs F.scaled_dot_product_attention")
    alone = _forward(mine, f"{what}: the short prompt alone", x[1:, 3:], COS, SIN)
    assert_close(got[1, 3:], alone[0], f"{what}: the padded prompt's real tokens should come out as when it runs alone "
                 "(RoPE sees only offsets, and no query sees a padding key)")
    mine_cache, ref_cache = KVCache(2, 2, 9, 8), KVCache(2, 2, 9, 8)
    _forward(mine, f"{what}, with a cache", x, COS, SIN, cache=mine_cache, padding_mask=pad)
    with torch.no_grad():
        ref(x, COS[:7], SIN[:7], kv_cache=ref_cache, attn_mask=causal_mask(7, 7, padding_mask=pad))
    for pos in (7, 8):
        pad = torch.cat([pad, torch.ones(2, 1, dtype=pad.dtype)], dim=1)
        step = torch.randn(2, 1, 32, generator=g)
        what = (f"decoding position {pos} of the padded batch (padding_mask of shape {tuple(pad.shape)}: the new token "
                "must not see the padding keys either)")
        got = _forward(mine, what, step, COS, SIN, cache=mine_cache, start_pos=pos, padding_mask=pad)
        with torch.no_grad():
            want = ref(step, COS[pos:pos + 1], SIN[pos:pos + 1], kv_cache=ref_cache, start_pos=pos,
                       attn_mask=causal_mask(1, pos + 1, padding_mask=pad))
        assert_close(got, want, what)


class _MisplacedCache:
    """A package KVCache written at the wrong position: what a layer that passes the wrong start_pos to update does."""

    def __init__(self, cache: KVCache, where: Callable[[int], int]):
        self.cache, self.where = cache, where

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.where(start_pos), k, v)


def _in_pieces(step: Callable[[torch.Tensor, int, KVCache], torch.Tensor], x: torch.Tensor, splits: list[int],
               n_kv_heads: int) -> torch.Tensor:
    """Feed x in consecutive pieces through a fresh cache (with room to spare); the outputs concatenated."""
    cache, outs, pos = KVCache(x.shape[0], n_kv_heads, x.shape[1] + 3, 8), [], 0
    with torch.no_grad():
        for n in splits:
            outs.append(step(x[:, pos:pos + n], pos, cache))
            pos += n
    return torch.cat(outs, dim=1)


def _decode_slips(ref: Attention, x: torch.Tensor, splits: list[int]) -> Mistakes:
    def pieces(step) -> Callable[[], torch.Tensor]:
        return lambda: _in_pieces(step, x, splits, ref.n_kv_heads)

    def rows(p: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return COS[p:p + n], SIN[p:p + n]

    return [
        ("the RoPE positions are not offset: the tokens of a piece sit at positions start_pos .. start_pos + T - 1, so "
         "they need the rows cos[start_pos:start_pos + T], not cos[:T]",
         pieces(lambda xp, p, c: ref(xp, *rows(0, xp.shape[1]), kv_cache=c, start_pos=p))),
        ("the cache is written at the wrong position (start_pos + 1): pass start_pos itself to cache.update",
         pieces(lambda xp, p, c: ref(xp, *rows(p, xp.shape[1]), kv_cache=_MisplacedCache(c, lambda s: s + 1),
                                     start_pos=p))),
        ("each piece attends only to itself: pass start_pos to cache.update (written at position 0 the piece "
         "overwrites the earlier tokens), and attend with the keys and values it returns (every position so far), "
         "not only this piece's", pieces(lambda xp, p, c: ref(xp, *rows(p, xp.shape[1])))),
        ("the mask of a piece is aligned top-left: its queries are the newest tokens, at positions start_pos .. "
         "start_pos + T - 1 of start_pos + T keys",
         pieces(lambda xp, p, c: ref(xp, *rows(p, xp.shape[1]), kv_cache=c, start_pos=p,
                                     attn_mask=_mask(xp.shape[1], p + xp.shape[1], top_left=True)))),
    ]


def check_attention_decode(run: NotebookRun):
    """A prompt then one token at a time (and a chunked prefill) through a KVCache == the uncached forward."""
    g = torch.Generator().manual_seed(6)
    for seed, (dim, n_heads, n_kv_heads) in enumerate(LAYERS[1:], start=20):
        ref, mine = _layers(run, dim, n_heads, n_kv_heads, seed)
        x = torch.randn(2, 9, dim, generator=g)
        with torch.no_grad():
            full = ref(x, COS[:9], SIN[:9])
        for splits in ([5, 1, 1, 1, 1], [1] * 9, [3, 4, 2]):
            what = (f"CausalSelfAttention({dim}, {n_heads}, {n_kv_heads}) fed 9 tokens in pieces {splits} through a "
                    "KVCache (start_pos = the tokens before each piece)")
            got = _in_pieces(lambda xp, p, c: _forward(mine, what, xp, COS, SIN, cache=c, start_pos=p), x, splits,
                             n_kv_heads)
            name_the_mistake(what, got, full, _decode_slips(ref, x, splits))
            assert_close(got, full, f"{what} vs the uncached forward")


# --- Part B -----------------------------------------------------------------------------------------------------------


def _reference_window_mask(q_len: int, kv_len: int, window: int) -> torch.Tensor:
    want = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        p = kv_len - q_len + i
        for j in range(max(0, p - window + 1), p + 1):
            want[i, j] = True
    return want


def check_sliding_window_mask(run: NotebookRun):
    for q_len, kv_len, window in ((6, 6, 3), (1, 10, 4), (3, 9, 2), (5, 5, 1), (4, 7, 100)):
        got = call(run, "sliding_window_mask", q_len, kv_len, window)
        want = _reference_window_mask(q_len, kv_len, window)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != torch.bool:
            raise AssertionError(f"sliding_window_mask({q_len}, {kv_len}, {window}) should be a bool tensor of shape "
                                 f"{tuple(want.shape)}, got {type(got).__name__} {getattr(got, 'dtype', '')} "
                                 f"{tuple(getattr(got, 'shape', ()))}")
        if not torch.equal(got, want):
            i, j = (int(t) for t in torch.nonzero(got != want)[0])
            raise AssertionError(f"sliding_window_mask({q_len}, {kv_len}, {window})[{i}, {j}] is {bool(got[i, j])}: "
                                 f"query {i} sits at position {kv_len - q_len + i} and should "
                                 f"{'' if want[i, j] else 'not '}see key {j}")


def check_kv_cache_bytes(run: NotebookRun):
    cases = [
        (dict(n_layers=32, n_kv_heads=8, head_dim=128, seq_len=32768), 32 * 8 * 128 * 32768 * 2 * 2),
        (dict(n_layers=32, n_kv_heads=8, head_dim=128, seq_len=32768, window=4096), 32 * 8 * 128 * 4096 * 2 * 2),
        (dict(n_layers=8, n_kv_heads=2, head_dim=64, seq_len=100, window=4096, batch_size=3, bytes_per_value=4),
         8 * 2 * 64 * 100 * 2 * 3 * 4),
    ]
    for kwargs, want in cases:
        got = call(run, "kv_cache_bytes", **kwargs)
        if got != want or not isinstance(got, int):
            raise AssertionError(f"kv_cache_bytes({kwargs}) = {got!r}, expected {want} (an int): keys and values, "
                                 "every layer, min(seq_len, window) positions")


def check_alibi_slopes(run: NotebookRun):
    """Compared with Hugging Face BLOOM's ALiBi, which carries the paper's rule for any head count."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for n in (1, 4, 8, 6, 12, 16, 20):
        want = build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1]  # slope * position 1
        assert_close(call(run, "alibi_slopes", n), want, f"alibi_slopes({n})", atol=1e-7, rtol=1e-6)


def _reference_alibi(q, k, v, slopes):
    """Query by query in float64: scores over keys 0..p, minus slope * distance."""
    B, H, T, d = q.shape
    S = k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, H, T, d, dtype=torch.float64)
    for h in range(H):
        for i in range(T):
            p = S - T + i
            distance = torch.arange(p, -1, -1, dtype=torch.float64)  # p - j for j = 0..p
            scores = torch.einsum("bd,bjd->bj", q[:, h, i], k[:, h, : p + 1]) / math.sqrt(d)
            scores = scores - float(slopes[h]) * distance
            out[:, h, i] = torch.einsum("bj,bjd->bd", scores.softmax(-1), v[:, h, : p + 1])
    return out.float()


def check_alibi_attention(run: NotebookRun):
    g = torch.Generator().manual_seed(0)
    for B, H, T, S, d in ((2, 4, 6, 6, 8), (1, 6, 3, 9, 16), (1, 2, 1, 5, 4)):
        q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (T, S, S))
        slopes = torch.rand(H, generator=g)
        got = call(run, "alibi_attention", q, k, v, slopes)
        assert_close(got, _reference_alibi(q, k, v, slopes), f"alibi_attention (B={B}, H={H}, T={T}, S={S}, d={d})")


def check_sink_cache(run: NotebookRun):
    for n_sink, window, chunks in ((2, 4, (3, 1, 2, 1, 1, 2, 2, 5, 1)), (1, 3, (1,) * 9), (4, 2, (7, 1, 3))):
        cache = call(run, "SinkKVCache", n_sink, window)
        seen_k = seen_v = None
        g = torch.Generator().manual_seed(n_sink)
        for n in chunks:
            k, v = torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 4, generator=g)
            seen_k = k if seen_k is None else torch.cat([seen_k, k], 2)
            seen_v = v if seen_v is None else torch.cat([seen_v, v], 2)
            N = seen_k.shape[2]
            keep = list(range(N)) if N <= n_sink + window else list(range(n_sink)) + list(range(N - window, N))
            result = _update(cache, k, v)
            what = f"SinkKVCache({n_sink}, {window}) after {N} tokens (expected positions {keep})"
            assert_close(result[0], seen_k[:, :, keep], f"{what}: keys")
            assert_close(result[1], seen_v[:, :, keep], f"{what}: values")


def _update(cache, k, v):
    try:
        result = cache.update(k, v)
    except NotImplementedError:
        raise AssertionError("`SinkKVCache.update` is not implemented yet: replace `raise NotImplementedError()` in "
                             "its cell") from None
    except Exception as e:
        raise AssertionError(f"`SinkKVCache.update` raised {type(e).__name__}: {e}") from e
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError("SinkKVCache.update should return a tuple (keys, values)")
    return result

"""Shared test helpers: the create_block_mask reference and exact BlockMask comparison."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from compiled_mask import Eagle3Attention, eagle3_mask_mod
from compiled_mask.inspect import GraphCounter, watch_recompiles

# The four (num, indices) pairs of a BlockMask, kv-direction first.
PAIRS = (
    ("kv_num_blocks", "kv_indices"),
    ("full_kv_num_blocks", "full_kv_indices"),
    ("q_num_blocks", "q_indices"),
    ("full_q_num_blocks", "full_q_indices"),
)


def reference_block_mask(Q_LEN, KV_LEN, BLOCK_SIZE=128, B=1, H=1, device="cpu",
                         seq_lens=None, doc_ids=None) -> BlockMask:
    """The ground truth: create_block_mask on the reference mask_mod."""
    mask_mod = eagle3_mask_mod(Q_LEN, seq_lens=seq_lens, doc_ids=doc_ids)
    return create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=BLOCK_SIZE)


def listed(num: Tensor, indices: Tensor) -> Tensor:
    """The set of indices each row lists, as a bool tensor ``[..., rows, width]``.

    Fails if a row lists an index twice or holds an index outside [0, width).
    """
    width = indices.shape[-1]
    assert indices.dtype == torch.int32 and num.dtype == torch.int32
    assert ((indices >= 0) & (indices < width)).all(), "index outside [0, width)"
    assert ((num >= 0) & (num <= width)).all(), "num outside [0, width]"
    valid = torch.arange(width, device=num.device) < num.unsqueeze(-1)  # [..., rows, width]
    counts = torch.zeros(indices.shape, dtype=torch.int32, device=num.device)
    counts.scatter_add_(-1, indices.long(), valid.int())
    assert counts.max() <= 1, "a row lists an index twice"
    return counts == 1


def assert_ascending(num: Tensor, indices: Tensor) -> None:
    """The listed entries of every row are strictly ascending (the layout kernels read)."""
    width = indices.shape[-1]
    valid = torch.arange(width, device=num.device) < num.unsqueeze(-1)
    steps = indices[..., 1:] - indices[..., :-1]
    assert (steps[valid[..., 1:]] > 0).all(), "listed indices are not ascending"


def assert_same_blocks(ours: BlockMask, ref: BlockMask, *, broadcast=False) -> None:
    """Exact parity: every row lists the same set in all four pairs, and to_dense() agrees."""
    assert ours.BLOCK_SIZE == ref.BLOCK_SIZE
    assert tuple(ours.seq_lengths) == tuple(ref.seq_lengths)
    for num_name, idx_name in PAIRS:
        on, oi = getattr(ours, num_name), getattr(ours, idx_name)
        rn, ri = getattr(ref, num_name), getattr(ref, idx_name)
        assert oi.shape == ri.shape and on.shape == rn.shape, (num_name, oi.shape, ri.shape)
        assert oi.is_contiguous() and on.is_contiguous()
        assert_ascending(on, oi)
        got, want = listed(on, oi), listed(rn, ri)
        if not torch.equal(got, want):
            diff = (got != want).nonzero()[:5].tolist()
            raise AssertionError(f"{num_name}/{idx_name} differ at [b, h, row, col] {diff}")
    assert torch.equal(ours.to_dense(), ref.to_dense())


def assert_same_live_blocks(ours: BlockMask, ref: BlockMask) -> None:
    """A static-width mask (key axis of Q_LEN * max_rounds) against create_block_mask's at the
    live length: every row lists the same blocks below the live end, in all four pairs, and
    nothing past it."""
    n_kv = ref.kv_indices.shape[-1]  # kv blocks of the live keys
    assert ours.BLOCK_SIZE == ref.BLOCK_SIZE
    for num_name, idx_name in PAIRS:
        got = listed(getattr(ours, num_name), getattr(ours, idx_name))
        want = listed(getattr(ref, num_name), getattr(ref, idx_name))
        assert_ascending(getattr(ours, num_name), getattr(ours, idx_name))
        if num_name.startswith(("kv", "full_kv")):  # [B, H, n_q, n_kv_max]: live columns first
            live, dead = got[..., :n_kv], got[..., n_kv:]
        else:  # [B, H, n_kv_max, n_q]: live rows first
            live, dead = got[..., :n_kv, :], got[..., n_kv:, :]
        if not torch.equal(live, want.expand_as(live)):
            diff = (live != want).nonzero()[:5].tolist()
            raise AssertionError(f"{num_name}/{idx_name} differ at [b, h, row, col] {diff}")
        assert not dead.any(), f"{num_name}: blocks listed past the live keys"


TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(got: Tensor, want: Tensor) -> float:
    """``||got - want|| / ||want||``, in float64."""
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def dense_reference_attention(q, k, v, allowed: Tensor, scale=None) -> Tensor:
    """float64 softmax attention over the pairs ``allowed`` (``[Q_LEN, KV_LEN]`` or
    ``[B, 1, Q_LEN, KV_LEN]``); GQA by repetition; rows with no allowed key give zeros."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.size(1) // k.size(1)
    k = k.repeat_interleave(groups, dim=1)  # [B, Hq, KV_LEN, D]
    v = v.repeat_interleave(groups, dim=1)  # [B, Hq, KV_LEN, Dv]
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, Hq, Q_LEN, KV_LEN]
    allowed = allowed.to(scores.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # empty rows: 0/0 -> 0
    return probs @ v  # [B, Hq, Q_LEN, Dv]


def eagle3_dense(Q_LEN: int, KV_LEN: int, live_kv_len: int | None = None,
                 seq_lens=None, doc_ids=None) -> Tensor:
    """The reference mask on the whole grid, ``[Q_LEN, KV_LEN]`` bool (``[B, 1, Q_LEN, KV_LEN]``
    with seq_lens/doc_ids); keys >= live_kv_len dead."""
    q = torch.arange(Q_LEN).unsqueeze(-1)
    kv = torch.arange(KV_LEN).unsqueeze(0)
    if seq_lens is not None or doc_ids is not None:
        B = (seq_lens if seq_lens is not None else doc_ids).shape[0]
        mask_mod = eagle3_mask_mod(Q_LEN, seq_lens=seq_lens, doc_ids=doc_ids)
        b = torch.arange(B).view(B, 1, 1, 1)
        allowed = mask_mod(b, None, q, kv)  # [B, 1, Q_LEN, KV_LEN]
    else:
        allowed = eagle3_mask_mod(Q_LEN)(None, None, q, kv)
    if live_kv_len is not None:
        allowed = allowed & (kv < live_kv_len)
    return allowed


def attention_magnitudes(q, k, v, dout, allowed: Tensor, scale=None) -> tuple[Tensor, ...]:
    """The scale at which a low precision rounds out, dq, dk and dv: the root sum of squares of
    the terms each one sums (``p_j v_j`` for out, ``p_i dO_i`` for dv, ``ds_ij k_j`` / ``ds_ij q_i``
    for dq / dk, where ``ds_ij = p_ij (dO_i . v_j - dO_i . out_i)`` is rounded on the scale of
    ``p_ij (|ds_ij / p_ij| + ||dO_i * out_i||)``: kernels compute ``dO . out`` from the stored,
    rounded output), in float64. Rounding
    each term adds errors of about that size in random directions. A result that is a small
    difference of large terms (dq of a query with two keys) has a norm far below it, and bf16 can
    only be right relative to it. Shapes and GQA as :func:`dense_reference_attention`."""
    q, k, v, dout = (t.detach().double() for t in (q, k, v, dout))
    groups = q.size(1) // k.size(1)
    k_, v_ = (t.repeat_interleave(groups, dim=1) for t in (k, v))  # [B, Hq, KV_LEN, *]
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k_.transpose(-1, -2) * scale).masked_fill(~allowed.to(q.device), float("-inf"))
    p = scores.softmax(-1).nan_to_num(0.0)  # [B, Hq, Q_LEN, KV_LEN]
    # ds = p (dP - Delta), dP = dO . v (exact products of the inputs, accumulated in fp32), Delta =
    # dO . out with out as stored, rounded: Delta's error is on the scale of its terms' root sum
    # of squares, as the others'.
    dp = dout @ v_.transpose(-1, -2)  # [B, Hq, Q_LEN, KV_LEN]
    out = p @ v_
    delta = (dout * out).sum(-1, keepdim=True)  # [B, Hq, Q_LEN, 1]
    delta_mag = ((dout * out) ** 2).sum(-1, keepdim=True).sqrt()
    ds2 = (p * ((dp - delta).abs() + delta_mag) * scale) ** 2
    fold = lambda t: t.unflatten(1, (k.size(1), groups)).sum(2)  # noqa: E731  [B, Hkv, ...]
    return tuple(t.sqrt() for t in (p**2 @ v_**2, ds2 @ k_**2, fold(ds2.transpose(-1, -2) @ q**2),
                                     fold((p**2).transpose(-1, -2) @ dout**2)))


def float64_reference(q, k, v, dout, allowed: Tensor, grads: bool = True) -> tuple[Tensor, tuple]:
    """Output and (dq, dk, dv) of :func:`dense_reference_attention` in float64 (Nones without
    ``grads``)."""
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    out = dense_reference_attention(q64, k64, v64, allowed.to(q.device))
    return out, (torch.autograd.grad(out, (q64, k64, v64), dout.double()) if grads else (None,) * 3)


# ----------------------------------------------------------------------------- CUDA tests


def cuda_qkv(B, Hq, Hkv, q_len, kv_len, D, dtype, seed=0, device="cuda"):
    """Random q, k, v (requiring grad) and dout on CUDA (or ``device``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=g)  # noqa: E731
    q, k, v = make(B, Hq, q_len, D), make(B, Hkv, kv_len, D), make(B, Hkv, kv_len, D)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), make(B, Hq, q_len, D)


def backend_errors(backends, q_len, max_rounds, live, Hq, Hkv, D, dtype) -> dict[str, list[float]]:
    """Relative errors of out, dq, dk, dv against float64, per compiled backend, on one input."""
    q, k, v, dout = cuda_qkv(2, Hq, Hkv, q_len, q_len * max_rounds, D, dtype)
    allowed = eagle3_dense(q_len, q_len * max_rounds, live_kv_len=q_len * live)
    want, want_grads = float64_reference(q, k, v, dout, allowed)
    errors = {}
    for backend in backends:
        attn = torch.compile(Eagle3Attention(q_len, max_rounds, backend=backend), fullgraph=True)
        out = attn(q, k, v, torch.tensor(live, device="cuda"))
        grads = torch.autograd.grad(out, (q, k, v), dout)
        errors[backend] = [rel_err(out, want)] + [rel_err(g, w) for g, w in zip(grads, want_grads)]
    print("rel errors out/dq/dk/dv:", errors)
    return errors


def assert_ttt_loop_one_graph(backend, q_len, Hq, Hkv, D, max_rounds=8):
    """A compiled fwd+bwd TTT loop over rounds 1..max_rounds compiles one graph."""
    counter = GraphCounter()
    attn = torch.compile(Eagle3Attention(q_len, max_rounds, backend=backend), backend=counter,
                         fullgraph=True)
    q, k, v, _ = cuda_qkv(1, Hq, Hkv, q_len, q_len * max_rounds, D, torch.bfloat16)
    with watch_recompiles() as reasons:
        for r in range(1, max_rounds + 1):
            attn(q, k, v, torch.tensor(r, device="cuda")).sum().backward()
    assert counter.graphs == 1, reasons
    assert reasons == []


def assert_cuda_graph_forward(backend, q_len, Hq, Hkv, D, max_rounds=4):
    """mode="reduce-overhead": the static-shape step replays as a CUDA graph, and stays right."""
    compiled = torch.compile(Eagle3Attention(q_len, max_rounds, backend=backend),
                             mode="reduce-overhead", fullgraph=True)
    q, k, v, _ = (t.detach() for t in cuda_qkv(1, Hq, Hkv, q_len, q_len * max_rounds, D, torch.bfloat16))
    rounds = [torch.tensor(r, device="cuda") for r in range(1, max_rounds + 1)]
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            outs = [compiled(q, k, v, r).clone() for r in rounds]
        for r, out in enumerate(outs, 1):
            allowed = eagle3_dense(q_len, q_len * max_rounds, live_kv_len=q_len * r).cuda()
            assert rel_err(out, dense_reference_attention(q, k, v, allowed)) < 1e-2

"""Differential fuzz of the public API: every input of the right shape is exact, or refused.

Each case draws a shape (Q_LEN aligned to the blocks or not, rounds, square and rectangular
blocks, B, H, GQA ratio, head dim), a dtype the backend takes, q/k/v as contiguous, transposed or
sliced views, ``rounds`` as a Python int or a tensor of any integer dtype (in range, 0, negative,
past max_rounds, the dtype's extremes) and a layout (seq_lens/doc_ids of any integer dtype and
strides, lengths past both ends, documents that come back after another id, -1 runs anywhere).
For every case:

- ``Eagle3BlockMask``: the block tensors equal create_block_mask's at the live length, and its
  mask_mod is the reference on the whole static key axis;
- ``Eagle3Attention``: the output, and the gradients where a backward exists, equal float64
  dense attention over the reference mask (eager here; eager == compiled == float64 in
  ``test_api_fuzz_compiled``, which draws fewer cases because each one compiles);
- a case broken in one argument raises ValueError naming that argument (``test_api_refuses``).

``tests/conftest.py`` loads a hypothesis profile that prints the reproduction blob of a failure.
The same harness runs all three backends compiled on a GPU (``test_api_fuzz_cuda``).
"""

from __future__ import annotations

import dataclasses

import pytest
import strategies
import torch
import torch.nn.attention.flex_attention as flex_module
from helpers import (
    assert_same_live_blocks,
    attention_magnitudes,
    eagle3_dense,
    float64_reference,
    reference_block_mask,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from compiled_mask import Eagle3Attention, Eagle3BlockMask

VIEWS = ("contiguous", "transposed", "sliced")


@dataclasses.dataclass
class Case:
    backend: str
    q_len: int
    max_rounds: int
    block_size: tuple[int, int] | None
    B: int
    Hq: int
    Hkv: int
    D: int
    Dv: int  # the value head dim (MLA-style drafts: D 192, Dv 128)
    dtype: torch.dtype
    views: tuple[str, str, str]  # of q, k, v
    rounds: int
    rounds_dtype: torch.dtype | None  # None: a Python int
    seq_lens: torch.Tensor | None
    doc_ids: torch.Tensor | None
    seed: int

    @property
    def live(self) -> int:
        """The live rounds the library must use: the value, clamped to [1, max_rounds]."""
        return min(max(self.rounds, 1), self.max_rounds)

    def rounds_arg(self, device="cpu"):
        if self.rounds_dtype is None:
            return self.rounds
        return torch.tensor(self.rounds, dtype=self.rounds_dtype, device=device)


@st.composite
def rounds_values(draw, max_rounds: int, python_int: bool = True):
    """``(value, dtype)``: a Python int in range, or a tensor of any integer dtype holding any of
    its values (the interesting ones more often)."""
    dtype = draw(st.sampled_from(((None,) if python_int else ()) + strategies.INT_DTYPES))
    if dtype is None:
        return draw(st.integers(1, max_rounds)), None
    info = torch.iinfo(dtype)
    special = [v for v in (0, -1, max_rounds + 1, info.min, info.max) if info.min <= v <= info.max]
    value = draw(st.one_of(st.integers(1, max_rounds), st.sampled_from(special),
                           st.integers(info.min, info.max)))
    return value, dtype


CPU_BLOCK_SIZES = tuple((kv_bs * r, kv_bs) for kv_bs in (16, 32, 64, 128) for r in (1, 2))


@st.composite
def cases(draw, backends=("split", "split", "flex"), dtypes=(torch.float32, torch.float32, torch.bfloat16),
          python_int=True, max_q_len=160, head_dims=(8, 16), block_sizes=CPU_BLOCK_SIZES):
    backend = draw(st.sampled_from(backends))
    q_len = draw(st.one_of(st.integers(1, max_q_len), st.sampled_from([16, 32, 64, 128])))
    max_rounds = draw(st.integers(1, 4))
    block_size = draw(st.sampled_from(block_sizes)) if backend == "flex" else None
    if backend == "fa4":
        q_len = draw(st.sampled_from([128, 256, 384, 300, 1000]))  # its supported Q_LENs (Hopper)
    Hkv = draw(st.integers(1, 2))
    B = draw(st.integers(1, 3))
    rounds, rounds_dtype = draw(rounds_values(max_rounds, python_int))
    seq_lens, doc_ids = draw(strategies.layouts(B, q_len))
    D = draw(st.sampled_from(head_dims))
    Dv = draw(st.sampled_from((D, D // 2, D + 8))) if backend != "fa4" else D
    return Case(
        backend=backend, q_len=q_len, max_rounds=max_rounds, block_size=block_size, B=B,
        Hq=Hkv * draw(st.integers(1, 3)), Hkv=Hkv, D=D, Dv=Dv,
        dtype=draw(st.sampled_from(dtypes)), views=tuple(draw(st.sampled_from(VIEWS)) for _ in "qkv"),
        rounds=rounds, rounds_dtype=rounds_dtype, seq_lens=seq_lens, doc_ids=doc_ids,
        seed=draw(st.integers(0, 2**16)),
    )


def _view(shape, kind, dtype, g, device):
    """Random values of ``shape`` ``[B, H, S, D]`` in a tensor laid out as ``kind`` (a leaf)."""
    B, H, S, D = shape
    make = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    if kind == "transposed":  # [B, S, H, D] storage, as attention layers produce it
        return make(B, S, H, D).transpose(1, 2)
    if kind == "sliced":  # offset heads and positions, rows wider than D
        return make(B, H + 1, S + 3, D + 5)[:, 1:, 3:, :D]
    return make(B, H, S, D)


def _inputs(case: Case, device="cpu"):
    g = torch.Generator().manual_seed(case.seed)
    kv_len = case.q_len * case.max_rounds
    q = _view((case.B, case.Hq, case.q_len, case.D), case.views[0], case.dtype, g, device)
    k = _view((case.B, case.Hkv, kv_len, case.D), case.views[1], case.dtype, g, device)
    v = _view((case.B, case.Hkv, kv_len, case.Dv), case.views[2], case.dtype, g, device)
    dout = torch.randn(*q.shape[:3], case.Dv, generator=g).to(device, case.dtype)
    return q, k, v, dout


def _layout(case: Case, device="cpu"):
    return {name: None if t is None else t.to(device) for name, t in
            (("seq_lens", case.seq_lens), ("doc_ids", case.doc_ids))}


def check_block_mask(case: Case, H: int = 1) -> None:
    """The static-width BlockMask of the case against create_block_mask at the live length."""
    block_size = case.block_size or (128, 128)
    ours = Eagle3BlockMask(case.q_len, case.max_rounds, block_size=block_size, H=H)(
        case.rounds_arg(), **_layout(case))
    B = 1 if case.seq_lens is None and case.doc_ids is None else case.B
    ref = reference_block_mask(case.q_len, case.q_len * case.live, block_size, B=B, H=H, **_layout(case))
    assert_same_live_blocks(ours, ref)
    kv_len = case.q_len * case.max_rounds
    want = eagle3_dense(case.q_len, kv_len, live_kv_len=case.q_len * case.live, **_layout(case))
    b = torch.arange(B).view(B, 1, 1, 1)
    q_idx, kv_idx = torch.arange(case.q_len).view(-1, 1), torch.arange(kv_len).view(1, -1)
    got = ours.mask_mod(b, None, q_idx, kv_idx)
    assert torch.equal(got.expand(B, 1, -1, -1), want.expand(B, 1, -1, -1))


def _tolerance(dtype):
    return 2e-5 if dtype in (torch.float32, torch.float64) else 1e-2


def check_attention(case: Case, *, compiled=False, device="cpu", grads=None) -> torch.Tensor:
    """Eagle3Attention on the case against float64 dense attention on the reference mask; with
    ``grads`` (default: where a backward runs) the q/k/v gradients too. Returns the output.

    On CPU flex_attention has no backward, so neither has flex, nor split with doc_ids (its causal
    part is flex; tests/test_docs.py checks the merge's gradients there)."""
    if grads is None:
        grads = device != "cpu" or (case.backend == "split" and case.doc_ids is None)
    q, k, v, dout = _inputs(case, device)
    layout = _layout(case, device)
    attn = Eagle3Attention(case.q_len, case.max_rounds, backend=case.backend, block_size=case.block_size)
    rounds = case.rounds_arg(device)
    if compiled:
        attn = torch.compile(attn, fullgraph=True)
        rounds = torch.as_tensor(rounds, device=device)  # a Python int is refused when compiled
    if grads:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    with torch.set_grad_enabled(grads):
        out = attn(q, k, v, rounds, **layout)
    allowed = eagle3_dense(case.q_len, case.q_len * case.max_rounds, live_kv_len=case.q_len * case.live,
                           **{name: None if t is None else t.cpu() for name, t in layout.items()})
    want, want_grads = float64_reference(q, k, v, dout, allowed.to(device), grads=grads)
    mags = attention_magnitudes(q, k, v, dout, allowed.to(device))  # bf16/fp16's yardstick
    assert out.shape == want.shape and out.dtype == case.dtype
    _assert_close(out, want, case.dtype, "out", mags[0])
    if grads:
        got = torch.autograd.grad(out, (q, k, v), dout)
        for name, g, w, m in zip(("dq", "dk", "dv"), got, want_grads, mags[1:]):
            _assert_close(g, w, case.dtype, name, m)
    return out.detach()


def _assert_close(got, want, dtype, name, magnitude=None):
    """float32: ``atol`` elementwise. bf16/fp16: ``||got - want||`` below 1e-2 of the larger of
    ``||want||`` and the root sum of squares of the terms it sums (``magnitude``,
    :func:`attention_magnitudes`).

    A gradient that is a small difference of large terms (dq of a query with two keys, D=8)
    cannot reach 1e-2 of its own norm in bf16: causal SDPA on the same inputs was off by the
    very same 1.5e-2 there (the split backend runs that kernel on CPU; a fresh-clone CI run
    drew such a case). Where nothing cancels, the terms' scale is the result's, and a wrong
    mask or merge is off by O(1) of it: a 5% error in the suffix probabilities still fails 23 of
    60 bf16 cases (the others have no suffix or few suffix keys). Subtler errors are the float32
    cases' to catch: a 5% error in the suffix's ds fails 10 of 60 float32 cases and no bf16 one
    (1 of 60 against the result's own norm)."""
    assert torch.isfinite(got).all(), name
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=_tolerance(dtype), msg=lambda m: f"{name}: {m}")
        return
    scale = want.double().norm() if magnitude is None else max(want.double().norm(), magnitude.norm())
    err = (got.double() - want.double()).norm()
    err = (err / scale).item() if scale > 0 else err.item()
    assert err < _tolerance(dtype), f"{name}: error {err} of the norm of its terms"


@pytest.fixture
def eager_flex_math(monkeypatch):
    """Eager flex_attention as plain math, without the torch.compile it calls internally (a compile
    per case would cost seconds). It still evaluates our mask_mod on the whole grid."""
    monkeypatch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


@pytest.mark.usefixtures("eager_flex_math")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), H=st.integers(1, 2))
def test_api_fuzz(case, H):
    check_block_mask(case, H)
    check_attention(case)


@pytest.mark.usefixtures("fresh_compile_state")
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(backends=("split", "flex"), dtypes=(torch.float32,), python_int=False, max_q_len=64))
def test_api_fuzz_compiled(case):
    """eager == compiled == float64: compiled flex reads our block tensors (forward only on CPU),
    compiled split runs its custom ops and written-out backward. (split with doc_ids refuses to
    compile on CPU, as tests/test_docs.py checks: its causal part needs flex's lse.)"""
    assume(case.backend != "split" or case.doc_ids is None)
    torch._dynamo.reset()
    compiled = check_attention(case, compiled=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
        eager = check_attention(case)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=2 * _tolerance(case.dtype))


# ----------------------------------------------------------------------------- refusals

def _break(case: Case, what: str):
    """The case's arguments with one of them broken, and the error message it must raise."""
    q, k, v, _ = _inputs(case)
    layout = _layout(case)
    rounds = case.rounds_arg()
    if what == "float rounds":
        rounds, match = torch.tensor(float(case.live)), r"rounds must be a 0-d int tensor, got shape \(\) and dtype torch.float32"
    elif what == "uint64 rounds":
        rounds, match = torch.tensor(case.live, dtype=torch.uint64), r"rounds has dtype torch.uint64"
    elif what == "1-d rounds":
        rounds, match = torch.tensor([case.live]), r"rounds must be a 0-d int tensor, got shape \(1,\)"
    elif what == "int rounds out of range":
        rounds = case.max_rounds + 1
        match = rf"rounds must be in \[1, max_rounds={case.max_rounds}\], got rounds={rounds}"
    elif what == "float seq_lens":
        layout["seq_lens"] = torch.full((case.B,), float(case.q_len))
        match = r"seq_lens must be an int tensor \[B\], got shape .* and dtype torch.float32"
    elif what == "seq_lens batch":
        layout = {"seq_lens": torch.full((case.B + 1,), case.q_len), "doc_ids": None}
        match = rf"seq_lens/doc_ids have batch {case.B + 1} but q has batch {case.B}"
    elif what == "doc_ids length":
        layout["doc_ids"] = torch.zeros(case.B, case.q_len + 1, dtype=torch.long)
        match = rf"doc_ids must be \[B, Q_LEN={case.q_len}\], got shape \({case.B}, {case.q_len + 1}\)"
    elif what == "k length":
        k, match = k[:, :, 1:], rf"static buffer of Q_LEN \* max_rounds = {case.q_len * case.max_rounds}"
    elif what == "v dtype":
        v, match = v.double(), r"q, k, v must share one floating dtype"
    else:  # "q head dim"
        q, match = q[..., 1:], rf"q and k must share the head dim D, got {case.D - 1} and {case.D}"
    return (q, k, v, rounds), layout, match


BREAKAGES = ("float rounds", "uint64 rounds", "1-d rounds", "int rounds out of range", "float seq_lens",
             "seq_lens batch", "doc_ids length", "k length", "v dtype", "q head dim")


@settings(max_examples=60, deadline=None)
@given(case=cases(dtypes=(torch.float32,)), what=st.sampled_from(BREAKAGES))
def test_api_refuses(case, what):
    """One broken argument: a ValueError that names it and the value, before anything runs."""
    args, layout, match = _break(case, what)
    attn = Eagle3Attention(case.q_len, case.max_rounds, backend=case.backend, block_size=case.block_size)
    with pytest.raises(ValueError, match=match):
        attn(*args, **layout)


# ----------------------------------------------------------------------------- GPU: all backends


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_compile_state")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(backends=("split", "flex", "fa4"), dtypes=(torch.bfloat16,), python_int=False,
                  max_q_len=1100, head_dims=(64, 128), block_sizes=((128, 128), (256, 128))))
def test_api_fuzz_cuda(case):
    """The same harness on CUDA: every backend compiled, bf16, forward and backward. (flex-Triton's
    backward has no tile config for 64-wide KV blocks on Hopper: README, Known limits.)"""
    from compiled_mask._fa4 import fa4_available

    assume(case.backend != "fa4" or fa4_available())  # (tests/test_fa4.py skips loudly without it)
    print(case, flush=True)  # a crash (an illegal access) leaves no falsifying example behind
    torch._dynamo.reset()
    check_attention(case, compiled=True, device="cuda")


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("backend, q_len, Hq, Hkv, block_size", [
    ("flex", 123, 2, 1, (128, 128)), ("flex", 122, 4, 2, (128, 128)), ("split", 123, 2, 1, None),
    ("flex", 64, 2, 1, (128, 128)), ("flex", 123, 2, 1, (256, 128))])
def test_flex_short_q_len_grouped_heads_cuda(backend, q_len, Hq, Hkv, block_size):
    """Q_LEN < 128 with grouped heads, where Inductor's flex decoding kernel has no tile that
    divides the Q block (the first three: flex failed to compile, NoValidChoicesError, found by
    test_api_fuzz_cuda on an H100; split with documents runs flex, at its default block, for its
    causal part: split takes no block_size) and where
    it has (the last two): compiled, forward and backward, exact (Note [flex decoding and grouped
    heads] in _flex.py)."""
    doc_ids = torch.tensor([[0] * 50 + [1] * (q_len - 50)]) if backend == "split" else None
    case = Case(backend=backend, q_len=q_len, max_rounds=2, block_size=block_size, B=1, Hq=Hq, Hkv=Hkv, D=64,
                Dv=64, dtype=torch.bfloat16, views=("contiguous",) * 3, rounds=2, rounds_dtype=torch.int8,
                seq_lens=None, doc_ids=doc_ids, seed=0)
    check_attention(case, compiled=True, device="cuda", grads=True)


def _once_wrong_cases(backend: str) -> list[Case]:
    """The three inputs that gave wrong attention with no error on an H200 (issue 12), on CUDA:
    seq_lens as a strided column, rounds in a narrow dtype (uint8 3; int32 2**31 - 1, which must
    clamp), documents that come back after another id and a -1 run inside a document."""
    cuda = torch.device("cuda")
    base = dict(backend=backend, q_len=300, max_rounds=4, block_size=None, B=3, Hq=8, Hkv=2, D=64, Dv=64,
                dtype=torch.bfloat16, views=("contiguous",) * 3, rounds=3, rounds_dtype=torch.int64,
                seq_lens=None, doc_ids=None, seed=0)
    lens = torch.tensor([[300, 3], [120, 5], [0, 7]], device=cuda)[:, 0]  # stride 2
    docs = torch.tensor([[0] * 100 + [1] * 100 + [0] * 100, [0] * 120 + [-1] * 30 + [0] * 150,
                         ([0] * 30 + [1] * 30) * 5], device=cuda)
    return [
        Case(**{**base, "seq_lens": lens}),
        Case(**{**base, "rounds_dtype": torch.uint8}),
        Case(**{**base, "rounds": 2**31 - 1, "rounds_dtype": torch.int32}),
        Case(**{**base, "doc_ids": docs}),
    ]


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("backend", ["flex", "split", "fa4"])
def test_inputs_once_wrong_on_cuda_are_exact(backend):
    """Each backend compiled, fwd+bwd against float64; the strided seq_lens also builds the same
    block tensors as its contiguous copy and as create_block_mask."""
    from compiled_mask import eagle3_block_mask
    from compiled_mask._fa4 import fa4_available
    from helpers import assert_same_blocks

    if backend == "fa4" and not fa4_available():
        pytest.skip("needs flash_attn.cute")
    for case in _once_wrong_cases(backend):
        torch._dynamo.reset()
        check_attention(case, compiled=True, device="cuda")
    lens = _once_wrong_cases(backend)[0].seq_lens
    ours = eagle3_block_mask(300, 1200, device="cuda", seq_lens=lens)
    assert_same_blocks(ours, eagle3_block_mask(300, 1200, device="cuda", seq_lens=lens.contiguous()))
    assert_same_blocks(ours, reference_block_mask(300, 1200, B=3, device="cuda", seq_lens=lens))

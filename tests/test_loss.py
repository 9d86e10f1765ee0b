"""The fused, chunked LM head + loss (compiled_mask/draft/loss.py) against its unfused reference."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import compiled_mask.draft.loss as loss_module
from compiled_mask.draft.loss import (
    TargetHead,
    TargetLogits,
    _default_chunk_rows,
    _head_loss_chunks,
    _head_loss_reference,
    head_loss,
)
from compiled_mask.inspect import GraphCounter

KINDS = ("probs", "ids", "logits", "head")
B, R, H, V, HT_EXTRA = 2, 37, 16, 50, 8
EPS = 1e-5
GRAD_SCALE = 1.7  # the incoming gradient of nll_sum: the backward must scale by it


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_case(kind, dtype=torch.float64, *, B=B, R=R, H=H, V=V, seed=0):
    """Inputs of one call, with targets close to the draft's own logits (so about half the rows
    hit), hidden a strided view ``[B, R, H]`` of a leaf ``[R + 4, B, H]``, some rows not counted
    and, for ids, some -1 (and one -3) targets. Everything is made in float64, then cast."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(R + 4, B, H, generator=g, dtype=torch.float64)
    norm_weight = 1 + 0.2 * torch.randn(H, generator=g, dtype=torch.float64)
    head_weight = torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H) * 3
    counted = torch.rand(B, R, generator=g) > 0.25
    with torch.no_grad():
        h = base.transpose(0, 1)[:, 2 : R + 2]  # [B, R, H]
        normed = norm_weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        draft_logits = F.linear(normed, head_weight)  # [B, R, V]
        noise = torch.randn(B, R, V, generator=g, dtype=torch.float64)
        if kind == "probs":  # rows need not sum to 1 (a truncated or low-precision target)
            target = torch.softmax(draft_logits + noise, -1) * (0.8 + 0.4 * torch.rand(B, R, 1, generator=g))
        elif kind == "ids":
            target = (draft_logits + noise).argmax(-1)  # [B, R]
            target[torch.rand(B, R, generator=g) < 0.2] = -1
            target[0, 3] = -3
        elif kind == "logits":
            target = TargetLogits(draft_logits + noise)
        else:  # teacher logits = draft logits + a projection of extra features
            extra = torch.randn(B, R, HT_EXTRA, generator=g, dtype=torch.float64)
            target = TargetHead(torch.cat((normed, extra), -1),
                                torch.cat((head_weight, torch.randn(V, HT_EXTRA, generator=g,
                                                                    dtype=torch.float64)), -1))
    if kind != "ids":
        target = cast_target(target, dtype)
    return base.to(dtype), norm_weight.to(dtype), head_weight.to(dtype), target, counted


def cast_target(target, dtype):
    if isinstance(target, TargetLogits):
        return TargetLogits(target.logits.to(dtype))
    if isinstance(target, TargetHead):
        return TargetHead(target.hidden.to(dtype), target.weight.to(dtype))
    return target.to(dtype) if target.dtype.is_floating_point else target


def hidden_view(base):
    return base.transpose(0, 1)[:, 2:-2]  # [B, R, H], strides (H, B * H, 1)


def run(fn, base, norm_weight, head_weight, target, counted, **kwargs):
    """``(nll_sum, hit_sum, [d base, d norm_weight, d head_weight])`` of ``GRAD_SCALE * nll_sum``."""
    leaves = [t.detach().clone().requires_grad_() for t in (base, norm_weight, head_weight)]
    nll, hit = fn(hidden_view(leaves[0]), leaves[1], leaves[2], target, counted, eps=EPS, **kwargs)
    (GRAD_SCALE * nll).backward()
    return nll.detach(), hit, [t.grad for t in leaves]


def assert_same(got, want):
    nll, hit, grads = got
    nll_ref, hit_ref, grads_ref = want
    assert torch.equal(nll, nll_ref) and torch.equal(hit, hit_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.equal(g, g_ref)


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 100, None])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_float64(kind, chunk_rows):
    case = make_case(kind)
    nll, hit, grads = run(head_loss, *case, chunk_rows=chunk_rows)
    nll_ref, hit_ref, grads_ref = run(_head_loss_reference, *case)
    assert nll.dtype == hit.dtype == torch.float64 and nll.shape == hit.shape == ()
    assert not hit.requires_grad
    torch.testing.assert_close(nll, nll_ref, rtol=1e-10, atol=0)
    assert hit == hit_ref
    assert 0.3 * case[-1].sum() < hit < case[-1].sum()  # the hit test has hits and misses
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert grads[0][:2].abs().sum() == 0 and grads[0][-2:].abs().sum() == 0  # outside the view


@pytest.mark.parametrize("dtype, nll_tol, grad_tol", [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 5e-3, 2e-2)])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_against_float64(kind, dtype, nll_tol, grad_tol):
    case = make_case(kind, dtype)
    nll, hit, grads = run(head_loss, *case, chunk_rows=8)
    assert nll.dtype == hit.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    # The reference in float64 on the same (rounded) inputs.
    case64 = [t.to(torch.float64) for t in case[:3]] + [cast_target(case[3], torch.float64), case[4]]
    nll_ref, _, grads_ref = run(_head_loss_reference, *case64)
    assert abs(nll.double() - nll_ref) <= nll_tol * nll_ref.abs()
    for g, g_ref in zip(grads, grads_ref):
        assert (g.double() - g_ref).norm() <= grad_tol * g_ref.norm()
    # Hits compare the low-precision draft logits: against the reference in the same dtype, where
    # a chunk's matmul may round a near tie differently from the whole one.
    _, hit_ref, _ = run(_head_loss_reference, *case)
    assert abs(hit - hit_ref) <= (0 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("target_dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ("probs", "logits", "head"))
def test_soft_target_dtype_independent_of_parameters(kind, target_dtype):
    """A float32 draft with a target in another dtype: the loss dtype widens to float64 with it."""
    base, norm_weight, head_weight, target, counted = make_case(kind, torch.float32)
    target = cast_target(target, target_dtype)
    nll, hit, grads = run(head_loss, base, norm_weight, head_weight, target, counted, chunk_rows=6)
    assert nll.dtype == (torch.float64 if target_dtype == torch.float64 else torch.float32)
    # The reference's draft in float64, its target as given (teacher logits in the target's dtype).
    nll_ref, hit_ref, grads_ref = run(_head_loss_reference, base.double(), norm_weight.double(),
                                      head_weight.double(), target, counted)
    assert abs(nll.double() - nll_ref) <= 1e-6 * nll_ref.abs()
    assert abs(hit - hit_ref) <= 1  # float32 draft logits against float64 ones: a near tie may flip
    for g, g_ref in zip(grads, grads_ref):
        assert (g.double() - g_ref).norm() <= 1e-5 * g_ref.norm()


@pytest.mark.parametrize("eps", [EPS, 0.0])
@pytest.mark.parametrize("kind", KINDS)
def test_rows_that_do_not_count_change_nothing(kind, eps):
    """NaN/inf in rows that do not count give, bit for bit, the result for zeros there."""
    base, norm_weight, head_weight, target, counted = make_case(kind, torch.float32)
    not_counted = ~counted
    if kind == "ids":
        not_counted = not_counted | (target < 0)  # a row with id -1 does not count either
    view_rows = torch.zeros(R + 4, B, dtype=torch.bool)
    view_rows[2 : R + 2] = not_counted.T  # [R + 4, B], rows of base under the view

    def fill(value):
        b = base.masked_fill(view_rows[..., None], value)
        if kind == "ids":
            t = target.masked_fill(~counted, 0 if value == 0 else 10**6)  # garbage ids
            return b, t
        if isinstance(target, TargetHead):
            return b, TargetHead(target.hidden.masked_fill(~counted[..., None], value), target.weight)
        if isinstance(target, TargetLogits):
            return b, TargetLogits(target.logits.masked_fill(~counted[..., None], value))
        return b, target.masked_fill(~counted[..., None], value)

    results = []
    for value in (0.0, float("nan"), float("inf"), -float("inf")):
        b, t = fill(value)
        results.append(run(lambda *a, **k: head_loss(*a, **{**k, "eps": eps}), b, norm_weight,
                           head_weight, t, counted, chunk_rows=6))
    assert torch.isfinite(results[0][0]) and all(torch.isfinite(g).all() for g in results[0][2])
    for other in results[1:]:
        assert_same(other, results[0])


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    base, norm_weight, head_weight, target, counted = make_case(kind, R=9)
    target_weight = None
    if isinstance(target, TargetHead):
        target, target_weight = target.hidden, target.weight
    elif isinstance(target, TargetLogits):
        target = target.logits
    for grads in ((True, True, True), (False, True, False), (False, False, False)):
        for recompute in (False, True):
            leaves = [t.clone().requires_grad_(g) for t, g in zip((base, norm_weight, head_weight), grads)]
            args = (hidden_view(leaves[0]), leaves[1], leaves[2], target, target_weight, counted, kind,
                    EPS, 4, *grads, recompute)
            torch.library.opcheck(torch.ops.compiled_mask.head_loss.default, args)


def compiled_step(base, norm_weight, head_weight, target, counted):
    nll, hit = head_loss(hidden_view(base), norm_weight, head_weight, target, counted, eps=EPS,
                         chunk_rows=8)
    return nll / counted.sum().clamp(min=1), hit


@pytest.mark.parametrize("backend, kinds", [("aot_eager", KINDS), ("inductor", ("probs", "head"))])
def test_compiled_fullgraph_matches_eager(backend, kinds, fresh_compile_state):
    for kind in kinds:
        torch._dynamo.reset()
        counter = GraphCounter(backend)
        step = torch.compile(compiled_step, backend=counter, fullgraph=True)
        for seed in (0, 1):  # new values, same shapes: no recompile
            case = make_case(kind, torch.float32, seed=seed)
            leaves = [t.clone().requires_grad_() for t in case[:3]]
            loss, hit = step(*leaves, *case[3:])
            loss.backward()
            eager = run(head_loss, *case, chunk_rows=8)
            n = case[-1].sum()
            torch.testing.assert_close(loss * n, eager[0], rtol=1e-6, atol=0)
            assert hit == eager[1]
            for leaf, g_ref in zip(leaves, eager[2]):
                torch.testing.assert_close(leaf.grad * n * GRAD_SCALE, g_ref, rtol=1e-5, atol=1e-6)
        assert counter.graphs == 1, (kind, counter.graphs)


def test_saves_no_row_by_vocab_tensor():
    """What autograd keeps for backward is the three gradients ([B, R, H], [H], [V, H]); the
    unfused reference keeps [B, R, V] tensors (the control: the bound bites)."""
    B, R, H, V = 2, 64, 16, 200
    base, norm_weight, head_weight, target, counted = make_case("probs", torch.float32, B=B, R=R, H=H, V=V)

    def saved_numels(fn):
        numels = []

        def pack(t):
            numels.append(t.numel())
            return t

        leaves = [t.clone().requires_grad_() for t in (base, norm_weight, head_weight)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            nll, _ = fn(hidden_view(leaves[0]), leaves[1], leaves[2], target, counted, eps=EPS)
        nll.backward()
        return numels

    bound = max(B * R * H, V * H)  # the largest input, under R * V
    assert bound < R * V
    ours = saved_numels(lambda *a, **k: head_loss(*a, **k, chunk_rows=8))
    assert ours and max(ours) <= bound, ours
    assert max(saved_numels(_head_loss_reference)) >= B * R * V


class _LargestOutput(TorchDispatchMode):
    """The largest tensor any aten op allocates while active (views are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new memory
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_buffers_bounded(kind):
    """Inside the op (its Python body, which a dispatch mode can see into) no tensor is larger
    than one chunk's [rows, V], or than the inputs' sizes; the reference's are [B, R, V]."""
    B, R, H, V, rows = 2, 64, 16, 200, 8
    base, norm_weight, head_weight, target, counted = make_case(kind, torch.float32, B=B, R=R, H=H, V=V)
    target_weight = None
    if isinstance(target, TargetHead):
        target, target_weight = target.hidden, target.weight
    elif isinstance(target, TargetLogits):
        target = target.logits
    bound = max(rows * V, B * R * H, V * (H + HT_EXTRA))
    assert bound < R * V
    with _LargestOutput() as mode:
        _head_loss_chunks(hidden_view(base), norm_weight, head_weight, target, target_weight,
                          counted, kind, EPS, rows, True, True, True)
    assert rows * V <= mode.largest <= bound
    with _LargestOutput() as mode:
        _head_loss_reference(hidden_view(base), norm_weight, head_weight,
                             make_case(kind, torch.float32, B=B, R=R, H=H, V=V)[3], counted, eps=EPS)
    assert mode.largest >= B * R * V


class _OpFlags(TorchDispatchMode):
    """The gradient flags each call of the op receives."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.compiled_mask.head_loss.default:
            self.flags.append(tuple(args[9:12]))
        return func(*args, **(kwargs or {}))


def test_computes_only_the_gradients_needed():
    base, norm_weight, head_weight, target, counted = make_case("ids", torch.float32)
    hidden = hidden_view(base)
    with _OpFlags() as mode:
        head_loss(hidden, norm_weight, head_weight.requires_grad_(), target, counted, eps=EPS)
        with torch.no_grad():
            head_loss(hidden, norm_weight, head_weight, target, counted, eps=EPS)
        head_loss(hidden.requires_grad_(), norm_weight, head_weight.detach(), target, counted, eps=EPS)
    assert mode.flags == [(False, False, True), (False, False, False), (True, False, False)]


@pytest.mark.parametrize("kind", KINDS)
def test_recompute_gives_the_same_gradients_bit_for_bit(kind):
    """recompute=True: the gradients are computed in the backward, from the saved inputs, by the
    same chunk loop: equal bit for bit to those computed in the forward, on a view, with
    uncounted rows, and with only some gradients asked for."""
    case = make_case(kind, torch.float32)
    assert_same(run(head_loss, *case, chunk_rows=6, recompute=True), run(head_loss, *case, chunk_rows=6))
    base, norm_weight, head_weight, target, counted = case

    def head_grad(recompute):  # the head weight's gradient alone asked for
        weight = head_weight.clone().requires_grad_()
        nll, _ = head_loss(hidden_view(base), norm_weight, weight, target, counted, eps=EPS, chunk_rows=6,
                           recompute=recompute)
        nll.backward()
        return weight.grad

    assert torch.equal(head_grad(True), head_grad(False))


def test_recompute_saves_the_inputs_not_the_gradients():
    """What autograd keeps from the forward: with recompute=True the op's tensor inputs (views of
    the caller's tensors: no new memory), else the three gradients, new tensors of the inputs'
    sizes. The backward computes with the gradient flags of the forward, only then."""
    base, norm_weight, head_weight, target, counted = make_case("probs", torch.float32)
    for recompute in (False, True):
        saved = []
        leaves = [t.clone().requires_grad_() for t in (base, norm_weight, head_weight)]
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
        with hooks, _OpFlags() as mode:
            nll, _ = head_loss(hidden_view(leaves[0]), leaves[1], leaves[2], target, counted, eps=EPS,
                               recompute=recompute)
        storages = {x.untyped_storage().data_ptr() for x in (*leaves, target, counted)}
        shares = [t.untyped_storage().data_ptr() in storages for t in saved]
        shapes = [tuple(t.shape) for t in saved]
        if recompute:
            assert saved and all(shares), shapes
        else:
            assert not any(shares), shapes
        with _OpFlags() as backward:
            nll.backward()
        assert backward.flags == ([(True, True, True)] if recompute else [])
        assert mode.flags == [(True, True, True)]


@pytest.mark.parametrize("recompute", [False, True])
def test_no_double_backward(recompute):
    """The op's gradients are constants to autograd, so create_graph=True is refused rather than
    giving second derivatives without the loss's part."""
    base, norm_weight, head_weight, target, counted = make_case("ids", torch.float64)
    hidden = hidden_view(base.clone().requires_grad_())
    nll, _ = head_loss(hidden, norm_weight, head_weight, target, counted, eps=EPS, recompute=recompute)
    with pytest.raises(RuntimeError, match=r"head_loss has no double backward \(create_graph=True\)"):
        torch.autograd.grad(nll, hidden, create_graph=True)


@pytest.mark.parametrize("device, elements", [("cpu", 2**26), ("cuda", 2**28)])
def test_default_chunk_rows(device, elements):
    """The largest power of two of rows within the device's element budget (Note [chunk size]):
    V = 32000 gives 2048 rows for the torch form, 8192 (a whole 8K sequence) for the kernel."""
    device = torch.device(device)
    assert _default_chunk_rows(32000, device) == {"cpu": 2048, "cuda": 8192}[device.type]
    for V in (1, 50, 300, 32000, 128256, 2**26, 2**27, 2**29):
        rows = _default_chunk_rows(V, device)
        assert rows >= 1 and rows & (rows - 1) == 0
        assert rows * V <= elements or rows == 1
        assert rows == 1 or 2 * rows * V > elements  # the largest such power of two


def test_docstring_example_runs():
    result = doctest.testmod(loss_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def _error_cases():
    h, nw, w = torch.randn(2, 7, 16), torch.ones(16), torch.randn(50, 16)
    c = torch.ones(2, 7, dtype=torch.bool)
    ids = torch.zeros(2, 7, dtype=torch.int64)
    ht, wt = torch.randn(2, 7, 12), torch.randn(50, 12)
    return [
        ((h[0], nw, w, ids, c), {}, r"hidden must be \[B, R, H\], got shape \(7, 16\)"),
        (("h", nw, w, ids, c), {}, r"hidden must be a Tensor, got str"),
        ((h, nw, w[:, :8], ids, c), {}, r"head_weight must be \[V, H\] with V >= 1 and H = 16"),
        ((h, nw, w[:0], ids, c), {}, r"head_weight must be \[V, H\] with V >= 1"),
        ((h, nw[:8], w, ids, c), {}, r"norm_weight must be \[H\] = \[16\].*got shape \(8,\)"),
        ((h.long(), nw, w, ids, c), {}, r"hidden must be floating point, got dtype torch.int64"),
        ((h, nw.bfloat16(), w.bfloat16(), ids, c), {},
         r"norm_weight \* normed\(hidden\) is torch.float32 .* but head_weight is torch.bfloat16"),
        ((h, nw, w, ids, c.float()), {}, r"counted must be a \[B, R\] = \[2, 7\] bool tensor, got .*torch.float32"),
        ((h, nw, w, ids, c[:, :3]), {}, r"counted must be a \[B, R\] = \[2, 7\] bool tensor, got shape \(2, 3\)"),
        ((h, nw, w, c, c), {}, r"target must be float probabilities .* got dtype torch.bool"),
        ((h, nw, w, ids[..., None], c), {}, r"an int target must be \[B, R\] = \[2, 7\]"),
        ((h, nw, w, torch.randn(2, 7), c), {}, r"a float target must be \[B, R, V\] = \[2, 7, 50\]"),
        ((h, nw, w, torch.randn(2, 7, 49), c), {}, r"a float target has 49 entries per row but .* V = 50"),
        ((h, nw, w, TargetLogits(torch.randn(2, 7, 51)), c), {}, r"TargetLogits.logits has 51 entries"),
        ((h, nw, w, TargetLogits(ids), c), {}, r"TargetLogits.logits must be a float Tensor, got torch.int64"),
        ((h, nw, w, TargetHead(ht[:1], wt), c), {}, r"TargetHead.hidden must be \[B, R, Ht\]"),
        ((h, nw, w, TargetHead(ht, wt[:, :5]), c), {}, r"TargetHead.weight must be \[V, Ht\] = \[50, 12\]"),
        ((h, nw, w, TargetHead(ht, wt.double()), c), {}, r"must share one float dtype, got torch.float32 and torch.float64"),
        ((h, nw, w, TargetHead(ht, None), c), {}, r"TargetHead must hold two Tensors"),
        ((h, nw, w, [ids], c), {}, r"target must be a Tensor .* got list"),
        ((h, nw, w, torch.empty(2, 7, 50, device="meta"), c), {}, r"target is on meta but hidden is on cpu"),
        ((h, nw, w, ids, c), {"chunk_rows": 0}, r"chunk_rows must be an int >= 1 or None, got chunk_rows=0"),
        ((h, nw, w, ids, c), {"chunk_rows": True}, r"chunk_rows=True"),
        ((h, nw, w, ids, c), {"chunk_rows": 2.0}, r"chunk_rows=2.0"),
        ((h, nw, w, ids, c), {"eps": -1e-6}, r"eps must be a finite number >= 0 .* got eps=-1e-06"),
        ((h, nw, w, ids, c), {"eps": float("nan")}, r"got eps=nan"),
        ((h, nw, w, ids, c), {"eps": "1e-5"}, r"got eps='1e-5'"),
        ((h, nw, w, ids, c), {"recompute": 1}, r"recompute must be True or False, got recompute=1"),
    ]


@pytest.mark.parametrize("args, kwargs, match", _error_cases())
def test_errors(args, kwargs, match):
    kwargs = {"eps": EPS, **kwargs}
    with pytest.raises(ValueError, match=match):
        head_loss(*args, **kwargs)

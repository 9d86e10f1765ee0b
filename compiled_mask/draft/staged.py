"""The "staged" memory policies: each TTT step's decoder layer as one op of the compiled graph.

``compiled_mask::staged_step`` runs one TTT step's decoder layer (``Eagle3Model._layer``) and
keeps only its inputs; ``compiled_mask::staged_step_backward`` replays the step and returns its
gradients. In the one compiled graph of the unroll, the backward op of step s reads the gradient
of step s's outputs, which step s + 1's backward op returns, so the replays run one after
another, each just before its gradients are needed, as eager autograd runs a checkpoint. Under
``torch.utils.checkpoint`` instead, the replayed ops depend only on what was saved, and the
partitioner and Inductor's scheduler move (and fuse) parts of every step's replay to the start of
the backward, holding them all at once (Note [memory policies] in ``unroll.py``).

Inside the ops the layer runs as two halves compiled on their own around the K/V buffer on CUDA
(``_COMPILED_ON``), eagerly elsewhere (its matmuls and the attention are the same kernels as in
the compiled graph; its norms, RoPE and SwiGLU unfused), the backward as ``torch.autograd.grad``
of the replay. The ops find the model by a key it registers, and take every tensor the layer reads
as an input, the weights included, so the graph orders them like any op and the replay uses the
weights the forward used.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from compiled_mask._inputs import Layout

__all__: list[str] = []

_MODELS: dict[int, weakref.ref] = {}  # key -> a live Eagle3Model with a staged memory policy
_keys = itertools.count()


def register(model: nn.Module) -> int:
    """A key under which the ops find ``model`` (an ``Eagle3Model``) while it lives."""
    key = next(_keys)
    _MODELS[key] = weakref.ref(model, lambda _: _MODELS.pop(key, None))
    return key


def _model(key: int) -> nn.Module:
    ref = _MODELS.get(key)
    model = ref() if ref is not None else None
    if model is None:
        raise RuntimeError(f"compiled_mask::staged_step: the Eagle3Model of key {key} no longer exists.")
    return model


# The device types on which the ops run the layer in two halves, each under torch.compile
# (Inductor fuses their norms, RoPE, SwiGLU and casts, eagerly a dozen memory-bound kernels
# each, and their float32 temporaries), around the K/V buffer built eagerly, so that both halves
# have one shape at every TTT step: one graph each, and one more each for the backward op's
# replay (with autograd). On an H100 at 32768 x 7 "staged" took 1661 ms and 15.2 GiB against
# 1855 ms and 18.2 GiB with the eager layer (docs/benchmarks.md, 2026-12-07, ninth session). Not
# on CPU, where eager is what the tests compare against; tests/test_draft.py runs it there too
# (float64, equal to "save"). The halves are shared by every model: each new shape, dtype or
# policy compiles them again, up to dynamo's recompile limit (beyond it they run eagerly).
_COMPILED_ON: tuple[str, ...] = ("cuda",)


@functools.cache
def _compiled_halves() -> tuple:
    """``Eagle3Model._project`` and ``_finish`` under ``torch.compile``, made at first use: making
    them warns (torch 2.13: fourteen "torch.jit.script_method is deprecated"), which importing the
    library must not."""
    return (torch.compile(lambda model, *args: model._project(*args), dynamic=False),
            torch.compile(lambda model, *args: model._finish(*args), dynamic=False))


class _Layer(nn.Module):
    """``Eagle3Model._layer`` as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids, hidden, cos, sin, first_key, documents, live, k_rounds, v_rounds):
        model = self.model
        parts = _compiled_halves() if hidden.device.type in _COMPILED_ON else (None, None)
        return model._layer(model.memory, ids, hidden, cos, sin, Layout(first_key, documents), live, k_rounds,
                            v_rounds, *parts)


def _run(key: int, weights: list[Tensor], *args) -> tuple[Tensor, Tensor, Tensor]:
    """The layer of model ``key`` with ``weights`` (``Eagle3Model._staged_params`` order) as its
    parameters."""
    model = _model(key)
    names = ["model." + name for name, _ in model._staged_params()]
    return torch.func.functional_call(_Layer(model), dict(zip(names, weights)), args)


@torch.library.custom_op("compiled_mask::staged_step", mutates_args=())
def _staged_step(key: int, ids: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor, first_key: Tensor | None,
                 documents: bool, live: Tensor, k_rounds: list[Tensor], v_rounds: list[Tensor],
                 weights: list[Tensor], trained: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Private op: one TTT step's decoder layer, ``(next hidden states, k_s, v_s)``, contiguous.

    Args:
        key: the model's key (:func:`register`).
        ids, hidden, cos, sin: the step's inputs (``Eagle3Model._layer``); first_key, documents:
            its ``Layout``; live: 0-d int, the live rounds of the step (s + 1).
        k_rounds, v_rounds: the K/V rounds of the earlier steps (none at step 0).
        weights: the layer's parameters (``Eagle3Model._staged_params`` order); trained: which of
            them the backward op returns gradients for.
    """
    # Detached: called eagerly, the op gets the caller's tensors, weights requiring grad, and the
    # compiled halves would guard on that (and compile again for a compiled caller's).
    k_rounds, v_rounds, weights = ([t.detach() for t in ts] for ts in (k_rounds, v_rounds, weights))
    with _autograd_dispatch(), torch.no_grad():
        out = _run(key, weights, ids, hidden.detach(), cos, sin, first_key, documents, live, k_rounds, v_rounds)
    return tuple(t.contiguous() for t in out)


@_staged_step.register_fake
def _(key, ids, hidden, cos, sin, first_key, documents, live, k_rounds, v_rounds, weights, trained):
    cfg = _model(key).draft_model.config
    B, L, _ = hidden.shape
    round_ = (B, cfg.num_key_value_heads, L, cfg.head_dim)
    return hidden.new_empty(hidden.shape), hidden.new_empty(round_), hidden.new_empty(round_)


# The backward op is defined with torch.library.Library rather than custom_op: its Autograd key
# falls through, so that nothing excludes autograd inside it and autograd records the replay.
# (custom_op's Autograd kernel runs the implementation below autograd, where no graph is
# recorded; torch.func.vjp refuses the custom ops inside the layer.)
_lib = torch.library.Library("compiled_mask", "FRAGMENT")
_lib.define("staged_step_backward(int key, Tensor d_hidden, Tensor d_k, Tensor d_v, Tensor ids, Tensor hidden, "
            "Tensor cos, Tensor sin, Tensor? first_key, bool documents, Tensor live, Tensor[] k_rounds, "
            "Tensor[] v_rounds, Tensor[] weights, bool[] trained) -> Tensor[]")


@contextlib.contextmanager
def _autograd_dispatch() -> Iterator[None]:
    """Autograd and ADInplaceOrView not excluded from dispatch, however the op was reached.

    The backward op's kernel runs with autograd excluded when a TorchDispatchMode handled the
    call, and its replay would then record nothing. The forward op is reached below autograd,
    under an outer torch.compile at the first step below ADInplaceOrView too and at later steps
    not: the compiled halves guard on the dispatch keys of their inputs, and would compile a
    third time each (7 graphs for a step, not 5). With this, both ops run the layer with the same
    keys at every call. (``FlopCounterMode`` still fails in the backward op: its module hooks
    refuse an ``autograd.grad`` inside a backward.)"""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


def _staged_step_backward(key: int, d_hidden: Tensor, d_k: Tensor, d_v: Tensor, ids: Tensor, hidden: Tensor,
                          cos: Tensor, sin: Tensor, first_key: Tensor | None, documents: bool, live: Tensor,
                          k_rounds: list[Tensor], v_rounds: list[Tensor], weights: list[Tensor],
                          trained: list[bool]) -> list[Tensor]:
    """The gradients of :func:`_staged_step`, its forward replayed first:
    ``[d hidden, *d k_rounds, *d v_rounds, *d weights (the trained ones)]``, contiguous."""
    s = len(k_rounds)
    with _autograd_dispatch(), torch.enable_grad():
        hidden = hidden.detach().requires_grad_()
        rounds = [r.detach().requires_grad_() for r in (*k_rounds, *v_rounds)]
        leaves = [w.detach().requires_grad_(t) for w, t in zip(weights, trained)]
        out = _run(key, leaves, ids, hidden, cos, sin, first_key, documents, live, rounds[:s], rounds[s:])
        wrt = [hidden, *rounds, *(w for w, t in zip(leaves, trained) if t)]
        grads = torch.autograd.grad(out, wrt, (d_hidden, d_k, d_v), allow_unused=True)
    # Each in its own storage (a round's gradient is a slice of its buffer's gradient); zeros for
    # a weight the layer did not use.
    return [torch.zeros_like(x) if g is None else g.clone(memory_format=torch.contiguous_format)
            for g, x in zip(grads, wrt)]


_lib.impl("staged_step_backward", _staged_step_backward, "CompositeExplicitAutograd")
_lib.impl("staged_step_backward", torch.library.fallthrough_kernel, "Autograd")


@torch.library.register_fake("compiled_mask::staged_step_backward")
def _(key, d_hidden, d_k, d_v, ids, hidden, cos, sin, first_key, documents, live, k_rounds, v_rounds, weights,
      trained):
    wrt = (hidden, *k_rounds, *v_rounds, *(w for w, t in zip(weights, trained) if t))
    return [x.new_empty(x.shape) for x in wrt]


def _setup(ctx, inputs, output) -> None:
    key, ids, hidden, cos, sin, first_key, documents, live, k_rounds, v_rounds, weights, trained = inputs
    ctx.args = (key, documents, trained, len(k_rounds), len(weights), first_key is not None)
    ctx.save_for_backward(ids, hidden, cos, sin, live, *k_rounds, *v_rounds, *weights,
                          *([first_key] if first_key is not None else []))


def _backward(ctx, d_hidden: Tensor, d_k: Tensor, d_v: Tensor):
    if torch.is_grad_enabled():  # backward(create_graph=True): the op's gradients have none of their own
        raise RuntimeError("Eagle3Model: the staged ops have no double backward (create_graph=True), and nor "
                           "has the draft's loss (head_loss, compiled_mask/draft/loss.py).")
    key, documents, trained, s, n, has_first_key = ctx.args
    ids, hidden, cos, sin, live, *rest = ctx.saved_tensors
    k_rounds, v_rounds, weights = rest[:s], rest[s:2 * s], rest[2 * s:2 * s + n]
    first_key = rest[-1] if has_first_key else None
    grads = torch.ops.compiled_mask.staged_step_backward(
        key, d_hidden.contiguous(), d_k.contiguous(), d_v.contiguous(), ids, hidden, cos, sin, first_key, documents,
        live, k_rounds, v_rounds, weights, trained)
    d_trained = iter(grads[1 + 2 * s:])
    d_weights = [next(d_trained) if t else None for t in trained]
    return (None, None, grads[0], None, None, None, None, None, grads[1:1 + s], grads[1 + s:1 + 2 * s], d_weights,
            None)


_staged_step.register_autograd(_backward, setup_context=_setup)


def staged_step(key: int, ids: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor, layout: Layout, live: Tensor,
                k_rounds: list[Tensor], v_rounds: list[Tensor], weights: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_staged_step`; the trained weights are those that require grad."""
    return _staged_step(key, ids, hidden, cos, sin, layout.first_key, layout.documents, live, k_rounds, v_rounds,
                        weights, [w.requires_grad for w in weights])

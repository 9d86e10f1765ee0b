"""Context parallel attention (compiled_mask.distributed) against the single-process Eagle3Attention.

Each multi-rank test spawns its ranks (gloo on CPU, NCCL on two GPUs); every rank builds the same
global inputs, runs the context-parallel module on its shards and checks its rows of the output
and of the q/k/v gradients against ``Eagle3Attention(backend="split")`` on the whole inputs. The
ranks' shards partition the positions (``test_shards_partition_the_sequence``), so together they
check every element. A failing rank raises, and ``mp.spawn`` re-raises its traceback here.

The draft step (``Eagle3Model(..., sequence=ContextParallel(...))`` under FSDP2's ``fully_shard``) is checked the same
way against the single-process ``Eagle3Model`` on the global batch (CPU) or the float64
written-out unroll of test_draft.py (GPU): loss, plosses, acces on every rank and every parameter's
gradient, unsharded.

CPU: ~16 s of process start-up per spawn (torch imports, two cores); compiled checks use
``aot_eager`` (dynamo + AOTAutograd trace the collectives into one fwd+bwd graph; Inductor also
compiles them on CPU, at ~100 s for the pair of ranks, too slow for CI: the GPU tests compile
with Inductor).
"""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import load_tool, rel_err

from test_draft import GPU_CFG, doc_layout, grads, make_batch, make_model, reference_unroll
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from compiled_mask import Eagle3Attention, Eagle3DraftConfig, Eagle3DraftModel
from compiled_mask.distributed import Eagle3ContextParallelAttention, shard_positions, shard_sequence
from compiled_mask.draft import ContextParallel, Eagle3Model
from compiled_mask.inspect import GraphCounter, watch_recompiles

# The 2-GPU machine's NVLink multicast is off (../shared/GPU.md): every process needs these.
_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


# ----------------------------------------------------------------------------- shards, one process


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("shard_order", ["zigzag", "contiguous"])
def test_shards_partition_the_sequence(world_size, shard_order):
    """Every position on exactly one rank; zigzag gives each rank the same causal work."""
    q_len = 24
    shards = [shard_positions(q_len, world_size, r, shard_order) for r in range(world_size)]
    assert all(s.dtype == torch.int64 and s.shape == (q_len // world_size,) for s in shards)
    torch.testing.assert_close(torch.cat(shards).sort().values, torch.arange(q_len))
    causal_work = [int((s + 1).sum()) for s in shards]  # keys a rank's queries attend in round 0
    if shard_order == "zigzag":
        assert len(set(causal_work)) == 1
    else:
        assert causal_work == sorted(causal_work) and len(set(causal_work)) == world_size


def test_docstring_examples():
    """The ``>>>`` examples of the module (shard_positions) run as written."""
    import doctest

    import compiled_mask.distributed

    result = doctest.testmod(compiled_mask.distributed)
    assert result.attempted >= 2 and result.failed == 0


def _class_example(rank, world_size):
    """Run the ``Example::`` block of Eagle3ContextParallelAttention's docstring on this rank."""
    import textwrap

    doc = Eagle3ContextParallelAttention.__doc__
    code = textwrap.dedent(doc.split("Example::", 1)[1])
    exec(code, {"torch": torch, "dist": dist, "shard_sequence": shard_sequence,
                "Eagle3ContextParallelAttention": Eagle3ContextParallelAttention})


def test_shard_positions_examples():
    assert shard_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert shard_positions(8, 2, 1, "contiguous").tolist() == [4, 5, 6, 7]
    assert shard_positions(12, 3, 2, "zigzag").tolist() == [4, 5, 6, 7]


def test_shard_sequence_shards_every_round():
    q_len, world_size, rank, rounds = 12, 3, 1, 4
    k = torch.arange(q_len * rounds).view(1, 1, q_len * rounds, 1).expand(2, 3, -1, 5)  # value = index
    local = shard_sequence(k, q_len, world_size, rank)
    positions = shard_positions(q_len, world_size, rank)
    want = torch.cat([s * q_len + positions for s in range(rounds)])  # round s's shard at [s*L, (s+1)*L)
    assert local.shape == (2, 3, rounds * 4, 5)
    assert torch.equal(local[0, 0, :, 0], want)
    doc_ids = torch.arange(q_len).view(1, q_len)
    assert torch.equal(shard_sequence(doc_ids, q_len, world_size, rank, dim=-1)[0], positions)


@pytest.mark.parametrize("call, message", [
    (lambda: shard_positions(10, 2, 0), r"shard_order='zigzag' cuts Q_LEN into 4 equal chunks over world_size=2 ranks, got q_len=10 \(not a multiple of 4\)"),
    (lambda: shard_positions(10, 3, 0, "contiguous"), r"got q_len=10 \(not a multiple of 3\)"),
    (lambda: shard_positions(8, 2, 2), r"rank must be an int in \[0, world_size=2\), got rank=2"),
    (lambda: shard_positions(8, 2, 0, "ring"), r"unknown shard_order='ring'; choose one of \['zigzag', 'contiguous'\]"),
    (lambda: shard_sequence(torch.zeros(1, 1, 10, 2), 8, 2, 0), r"dim 2 of x must hold whole rounds of q_len=8 positions, got x.shape=\(1, 1, 10, 2\)"),
    (lambda: Eagle3ContextParallelAttention(8, 2), r"torch.distributed is not initialised"),
])
def test_errors_without_a_group(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- spawned ranks


def _entry(rank, world_size, store, backend, check, args):
    """One rank: set up the group and the device, run ``check(rank, world_size, device, *args)``."""
    os.environ.update(_NCCL_ENV)
    torch.set_num_threads(1)  # 2 cores: 4 ranks would oversubscribe
    torch._dynamo.reset()  # a forked rank starts with the parent's compiled frames
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    # Ranks whose collectives do not match (Note [every rank's reduce-scatter depends on dO]) fail
    # after this long instead of hanging the suite; it also bounds a peer's compile before a collective.
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    try:
        check(rank, world_size, device, *args)
    finally:
        dist.destroy_process_group()


def _spawn(check, world_size, *args, backend="gloo"):
    with tempfile.TemporaryDirectory() as tmp:
        old = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", *_NCCL_ENV)}
        os.environ.update(_NCCL_ENV, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))  # fresh cache
        try:
            # Note [fork on CPU]: a spawned rank re-imports torch (10-25 s on two busy cores); a
            # forked one inherits it. CUDA cannot be forked once initialised: NCCL ranks spawn.
            mp.start_processes(_entry, args=(world_size, os.path.join(tmp, "store"), backend, check, args),
                               nprocs=world_size, start_method="spawn" if backend == "nccl" else "fork")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _inputs(B, Hq, Hkv, q_len, max_rounds, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    kv_len = q_len * max_rounds
    return make(B, Hq, q_len, D), make(B, Hkv, kv_len, D), make(B, Hkv, kv_len, D), make(B, Hq, q_len, D)


class _Reference:
    """Eagle3Attention(backend="split") on the whole inputs: output and q/k/v gradients."""

    def __init__(self, q_len, max_rounds, inputs, compiled=False):
        self.q_len, self.inputs = q_len, inputs
        self.attn = Eagle3Attention(q_len, max_rounds, backend="split")
        if compiled:
            self.attn = torch.compile(self.attn, fullgraph=True)

    def __call__(self, live, grads=True, **layout):
        q, k, v, dout = self.inputs
        return _output_and_grads(self.attn, q, k, v, dout, live, grads, layout)


def _output_and_grads(attn, q, k, v, dout, live, grads, layout):
    """``(out, dq, dk, dv)``, or ``(out,)`` without ``grads`` (computed under no_grad)."""
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    with torch.set_grad_enabled(grads):
        out = attn(*leaves, torch.tensor(live, device=q.device), **layout)
    return (out, *torch.autograd.grad(out, leaves, dout)) if grads else (out,)


def _run_sharded(attn, inputs, live, rank, world_size, q_len, shard_order, grads=True, **doc_layout):
    """The module on this rank's shards: its output and q/k/v gradients (or its output alone)."""
    q, k, v, dout = (shard_sequence(t, q_len, world_size, rank, shard_order) for t in inputs)
    return _output_and_grads(attn, q, k, v, dout, live, grads, doc_layout)


def _assert_shard_matches(got, want, rank, world_size, q_len, shard_order, tol, what):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        w = shard_sequence(w, q_len, world_size, rank, shard_order)
        assert g.shape == w.shape and g.dtype == w.dtype, (what, name, g.shape, w.shape)
        err = rel_err(g, w)
        assert err < tol, f"rank {rank} {what}: {name} rel err {err:.2e} (tolerance {tol})"


def _doc_layouts():
    """seq_lens and doc_ids for a batch of 2 (global: every rank builds the same)."""
    return {
        "seq_lens": torch.tensor([37, 13]),  # padding past a zigzag chunk boundary
        "doc_ids": torch.tensor([[0] * 9 + [1] * 20 + [0] * 15 + [-1] * 4,  # three runs, padding
                                 [5] * 30 + [-1] * 18]),
    }


# (mode, shard_order) pairs each world size checks; Ulysses needs Hq, Hkv divisible by the world size.
_MODES = [("allgather", "zigzag"), ("allgather", "contiguous"), ("ulysses", "zigzag"), ("ulysses", "contiguous")]


def _nan_at_padding(inputs, seq_lens, q_len):
    """``(q, k, v, dout)`` with NaN in q, k and v (every round) at the positions past ``seq_lens``."""
    q, k, v, dout = (t.clone() for t in inputs)
    padding = torch.arange(q_len) >= seq_lens[:, None]  # [B, Q_LEN]
    q[padding[:, None, :, None].expand_as(q)] = float("nan")
    rounds = padding.repeat(1, k.size(2) // q_len)[:, None, :, None]  # [B, 1, KV_LEN, 1]
    k[rounds.expand_as(k)] = float("nan")
    v[rounds.expand_as(v)] = float("nan")
    return q, k, v, dout


def _check_eager(rank, world_size, device):
    """Both modes and shard orders, a dead round, seq_lens (both modes), doc_ids (Ulysses), the errors."""
    q_len, max_rounds, live = 48, 3, 2
    inputs = _inputs(2, 8, 4, q_len, max_rounds, 16, torch.float32, device)
    reference = _Reference(q_len, max_rounds, inputs)
    want = reference(live)
    doc = _doc_layouts()
    want_seq = reference(live, seq_lens=doc["seq_lens"])
    want_doc = reference(live, grads=False, doc_ids=doc["doc_ids"])  # CPU flex has no backward
    for mode, shard_order in _MODES:
        attn = Eagle3ContextParallelAttention(q_len, max_rounds, mode=mode, shard_order=shard_order)
        assert torch.equal(attn.positions, shard_positions(q_len, world_size, rank, shard_order))
        assert attn.kv_len == max_rounds * q_len // world_size  # the local buffer's length
        run = lambda **kw: _run_sharded(attn, inputs, live, rank, world_size, q_len, shard_order, **kw)  # noqa: E731
        check = lambda got, want, what: _assert_shard_matches(  # noqa: E731
            got, want, rank, world_size, q_len, shard_order, 1e-5, f"{mode}/{shard_order} {what}")
        check(run(), want, "plain")
        check(run(seq_lens=doc["seq_lens"]), want_seq, "seq_lens")
        dirty = _run_sharded(attn, _nan_at_padding(inputs, doc["seq_lens"], q_len), live, rank, world_size, q_len,
                             shard_order, seq_lens=doc["seq_lens"])
        check(dirty, want_seq, "seq_lens, NaN in q, k and v at padding")  # Note [padding is garbage]
        if mode == "ulysses":
            check(run(grads=False, doc_ids=doc["doc_ids"]), want_doc, "doc_ids (forward)")
        else:
            with pytest.raises(NotImplementedError, match="doc_ids with mode='allgather' is not supported yet"):
                run(doc_ids=doc["doc_ids"])
    _class_example(rank, world_size)
    # User errors need a group, so they are checked here.
    attn = Eagle3ContextParallelAttention(q_len, max_rounds, mode="ulysses")
    q, k, v, _ = _inputs(1, 3 * world_size, 3, q_len, max_rounds, 16, torch.float32, device)
    with pytest.raises(ValueError, match=rf"mode='ulysses' gives each of the {world_size} ranks a slice of the heads, got Hkv=3, not a multiple of {world_size}"):
        attn(*(shard_sequence(t, q_len, world_size, rank) for t in (q, k, v)), torch.tensor(1))
    with pytest.raises(ValueError, match=r"q must be this rank's shard of Q_LEN / world_size = \d+ positions"):
        attn(q, k, v, torch.tensor(1))  # the global tensors, not the shards
    with pytest.raises(ValueError, match="mode='allgather' runs the split backend's kernels"):
        Eagle3ContextParallelAttention(q_len, max_rounds, mode="allgather", backend="flex")
    q, k, v, _ = (shard_sequence(t, q_len, world_size, rank) for t in inputs)
    with pytest.raises(NotImplementedError, match=r"mode='allgather' gathers round 0 of k and v as one tensor and "
                       r"needs one head dim, got D=16 and Dv=8\. Use mode='ulysses' for MLA-style heads"):
        Eagle3ContextParallelAttention(q_len, max_rounds, mode="allgather")(q, k, v[..., :8], torch.tensor(1))


def _check_compiled(rank, world_size, device, modes, dtype, tol, backend, Hq, Hkv, q_len, D):
    """A compiled TTT loop (rounds 1..max_rounds, fwd+bwd) per mode: one graph per rank, each step
    equal to the reference."""
    max_rounds = 3
    inputs = _inputs(1, Hq, Hkv, q_len, max_rounds, D, dtype, device, seed=1)
    reference = _Reference(q_len, max_rounds, inputs, compiled=device.type == "cuda")
    wants = [reference(live) for live in range(1, max_rounds + 1)]
    for mode, shard_order, attn_backend in modes:
        torch._dynamo.reset()
        counter = GraphCounter(backend)
        attn = torch.compile(
            Eagle3ContextParallelAttention(q_len, max_rounds, mode=mode, shard_order=shard_order, backend=attn_backend),
            backend=counter, fullgraph=True,
        )
        with watch_recompiles() as reasons:
            for live, want in enumerate(wants, 1):
                got = _run_sharded(attn, inputs, live, rank, world_size, q_len, shard_order)
                _assert_shard_matches(got, want, rank, world_size, q_len, shard_order, tol,
                                      f"compiled {mode}/{shard_order}/{attn_backend} rounds={live}")
        assert (counter.graphs, reasons) == (1, []), (mode, shard_order, counter.graphs, reasons)


def test_two_ranks_eager():
    _spawn(_check_eager, 2)


def test_four_ranks_eager():
    _spawn(_check_eager, 4)


def test_two_ranks_compiled_one_graph():
    """Both modes; the contiguous shard order's rank 0 has no prefix keys (Note [every rank's
    reduce-scatter depends on dO]: its collectives once moved graphs, and the ranks hung)."""
    modes = [("allgather", "zigzag", "split"), ("allgather", "contiguous", "split"), ("ulysses", "zigzag", "split")]
    _spawn(_check_compiled, 2, modes, torch.float32, 1e-5, "aot_eager", 4, 2, 48, 16)


# ----------------------------------------------------------------------------- the draft step


def _draft_batch(cfg, q_len, seed, target, layout, device):
    """A global batch (the same on every rank) and its layout keywords: ``target`` "probs" or
    "ids", ``layout`` None, "seq_lens" or "doc_ids"."""
    batch = make_batch(2, q_len, cfg, seed=seed, ids_target=target == "ids", device=device)
    kw = {}
    if layout == "seq_lens":
        kw = {"seq_lens": torch.tensor([q_len - 9 - seed, 13 + seed])}  # ends inside chunks
    elif layout == "doc_ids":
        kw = dict(zip(("seq_lens", "doc_ids"), doc_layout(2, q_len, seed)))
    return batch, {k: v.to(device) for k, v in kw.items()}


def _local_inputs(batch, q_len, world_size, rank, shard_order):
    """What a rank passes (context_parallel.py's table): hidden states and a float target
    sharded, ids, int targets and the loss mask global."""
    input_ids, hidden, target, loss_mask = batch
    shard = lambda x: shard_sequence(x, q_len, world_size, rank, shard_order, dim=1)  # noqa: E731
    return input_ids, shard(hidden), shard(target) if target.dtype.is_floating_point else target, loss_mask


def _cp_draft_model(reference, mode, shard_order, device, dtype):
    """The reference's model with the sequence sharded over the world (ContextParallel), its
    weights, fully_shard over the world."""
    model = Eagle3Model(Eagle3DraftModel(reference.draft_model.config), reference.q_len, reference.length,
                        memory=reference.memory, sequence=ContextParallel(mode=mode, shard_order=shard_order))
    model.load_state_dict(reference.state_dict())
    model.to(device, dtype)
    fully_shard(model, mesh=init_device_mesh(device.type, (dist.get_world_size(),)))
    return model


def _full_grads(model):
    """``{name: gradient}`` of the FSDP model, unsharded (each rank holds a shard)."""
    return {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}


# (mode, shard_order, target, seq_lens/doc_ids); Q_LEN 48, 3 TTT steps: step 2 reads 2 rows of the next
# chunk (zigzag: chunks of 12; contiguous: 24).
_DRAFT_COMPILED = [("allgather", "zigzag", "probs", "seq_lens"), ("allgather", "contiguous", "probs", "seq_lens"),
                   ("ulysses", "zigzag", "ids", None)]
_DRAFT_EAGER = [("allgather", "contiguous", "ids", "seq_lens"), ("ulysses", "contiguous", "probs", None),
                ("ulysses", "zigzag", "probs", "doc_ids"), ("ulysses", "zigzag", "ids", "doc_ids"),
                ("allgather", "zigzag", "probs", "seq_lens", "recompute_tiled"),  # a memory policy: the layer's
                ("ulysses", "zigzag", "ids", "seq_lens", "recompute")]            # collectives run again in backward


def _check_draft_step(rank, world_size, device, cases, compiler):
    """Each case (with its memory policy, "save" unless named): two training steps of the
    context-parallel Eagle3Model under fully_shard (compiled with ``compiler``, or eager for None)
    against the single-process Eagle3Model on the global batch: loss, plosses and acces on every
    rank, every parameter's gradient (the embedding's too: it reads the shifted ids), and one
    graph per rank for both steps."""
    q_len, length = 48, 3
    for mode, shard_order, target, doc, *memory in cases:
        torch._dynamo.reset()
        reference = make_model(q_len=q_len, length=length, seed=5, memory=memory[0] if memory else "save")
        cfg = reference.draft_model.config
        model = _cp_draft_model(reference, mode, shard_order, device, torch.float32)
        counter = GraphCounter(compiler or "eager")
        step = model if compiler is None else torch.compile(model, backend=counter, fullgraph=True)
        with watch_recompiles() as reasons:
            for seed in (1, 2):
                what = f"rank {rank} {mode}/{shard_order} target={target} {doc} {memory} seed={seed}"
                batch, kw = _draft_batch(cfg, q_len, seed, target, doc, device)
                want = reference(*batch, **kw)
                got = step(*_local_inputs(batch, q_len, world_size, rank, shard_order), **kw)
                for name in ("loss", "plosses", "acces"):  # the global values, on every rank
                    torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{what} {name}: {m}")  # noqa: B023
                got.loss.backward()
                want.loss.backward()
                got_grads = _full_grads(model)
                assert sorted(got_grads) == sorted(n for n, p in reference.named_parameters()), what
                for name, ref in reference.named_parameters():
                    err = rel_err(got_grads[name], ref.grad)
                    assert err < 1e-5, f"{what}: {name} gradient rel err {err:.2e}"
                model.zero_grad(set_to_none=True)
                reference.zero_grad(set_to_none=True)
        if compiler is not None:
            assert (counter.graphs, reasons) == (1, []), (what, counter.graphs, reasons)


def _check_draft_eager_and_errors(rank, world_size, device):
    """The eager cases, the class example, and the errors that need a group."""
    _check_draft_step(rank, world_size, device, _DRAFT_EAGER, None)
    import textwrap

    code = textwrap.dedent(ContextParallel.__doc__.split("Example::", 1)[1])
    with torch.compiler.set_stance("force_eager"):  # its Inductor compile takes ~90 s on CPU
        exec(code, {"torch": torch, "dist": dist, "shard_sequence": shard_sequence,
                    "Eagle3DraftConfig": Eagle3DraftConfig, "Eagle3DraftModel": Eagle3DraftModel,
                    "Eagle3Model": Eagle3Model, "ContextParallel": ContextParallel})
    model = make_model(q_len=48, length=3)
    cp = Eagle3Model(model.draft_model, 48, 3, sequence=ContextParallel())
    with pytest.raises(ValueError, match=r"this ContextParallel is already bound to a model with q_len=48"):
        Eagle3Model(model.draft_model, 96, 3, sequence=cp.sequence)
    batch, _ = _draft_batch(model.draft_model.config, 48, 0, "probs", None, device)
    input_ids, hidden, target, loss_mask = _local_inputs(batch, 48, world_size, rank, "zigzag")
    shard_hint = rf"\. Pass this rank's shard: shard_sequence\({{}}, 48, 2, rank={rank}, shard_order='zigzag', dim=1\)"
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, L, 3 \* target_hidden_size\] with B = 2 "
                       r"\(from input_ids\), L = 24, got shape \(2, 48, 192\)" + shard_hint.format("hidden_states")):
        cp(input_ids, batch[1], target, loss_mask)
    with pytest.raises(ValueError, match=r"a float target must be \[B, L, draft_vocab_size\] = \[2, 24, 120\] "
                       r"probabilities, got shape \(2, 48, 120\)" + shard_hint.format("target")):
        cp(input_ids, hidden, batch[2], loss_mask)
    with pytest.raises(ValueError, match=r"loss_mask must be \[B, T\] = \[2, 48\], got \(2, 24\) \(every rank "
                       r"passes the global loss_mask"):
        cp(input_ids, hidden, target, loss_mask[:, :24])
    with pytest.raises(ValueError, match=r"up to length - 1 = 7 positions ahead, which must lie within the next "
                       r"chunk; shard_order='zigzag' cuts q_len=24 into chunks of 6 over 2 ranks\. Use a q_len of at "
                       r"least 28"):
        Eagle3Model(model.draft_model, 24, 8, sequence=(refused := ContextParallel()))
    Eagle3Model(model.draft_model, 48, 3, sequence=refused)  # a refused bind leaves it unbound


def test_two_ranks_draft_step_compiled():
    """FSDP2 + the compiled step (aot_eager), both modes (all-gather in both shard orders): one graph per
    rank, equal to one process."""
    _spawn(_check_draft_step, 2, _DRAFT_COMPILED, "aot_eager")


def test_two_ranks_draft_step_eager():
    """FSDP2, eager: both modes and shard orders, both targets, seq_lens, doc_ids; the docstring
    example; input errors."""
    _spawn(_check_draft_eager_and_errors, 2)


def test_train_script_under_torchrun():
    """tools/train.py --context-parallel, launched by torchrun on 2 CPU ranks (gloo, FSDP2): the
    losses of the single-process run of the same flags. Eager, for time (the spawned tests above
    check the compiled step; the tool compiles it the same way)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    flags = ["--q-len", "32", "--batch", "2", "--ttt-steps", "3", "--steps", "3", "--hidden", "32",
             "--intermediate", "64", "--heads", "2", "--kv-heads", "2", "--vocab", "64",
             "--draft-vocab", "32", "--batches", "2", "--compiler", "none"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    last = {}
    for name, cmd in (("cp", [*torchrun, "tools/train.py", "--context-parallel", "allgather", *flags]),
                      ("one", [sys.executable, "tools/train.py", *flags])):
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        lines = run.stdout.strip().splitlines()
        match = re.fullmatch(r"trained 3 steps: loss (\d+\.\d+) -> (\d+\.\d+), graphs compiled: 0", lines[-1])
        assert match, (name, lines[-1])
        last[name] = (float(match[1]), float(match[2]))
        if name == "cp":  # rank 0 prints, once
            assert sum(line.startswith("Eagle3 draft:") for line in lines) == 1, lines
            assert "context parallel 'allgather' (zigzag) over 2 ranks, FSDP2" in lines[0], lines[0]
    for got, want in zip(last["cp"], last["one"]):  # printed to 3 decimals: allow one rounding step
        assert abs(got - want) <= 1.5e-3, last


# ----------------------------------------------------------------------------- the benchmark


def _load_bench():
    return load_tool("bench_distributed")


def test_bench_bytes_per_step_match_the_docs():
    """The per-rank bytes docs/context_parallel.md tabulates (32/8 heads, d=128, 7 rounds, bf16)."""
    bytes_per_step = _load_bench().bytes_per_step
    args = dict(max_rounds=7, B=1, Hq=32, Hkv=8, D=128, elt=2)
    gb = lambda mode, q_len, P: round(bytes_per_step(mode, q_len, P, **args) / 1e9, 2)  # noqa: E731
    assert [gb("ulysses", 131072, P) for P in (2, 8)] == [2.95, 1.29]
    assert [gb("allgather", 131072, P) for P in (2, 8, 64)] == [0.54, 0.94, 1.06]
    assert [gb("ulysses", 65536, 2), gb("allgather", 65536, 2)] == [1.48, 0.27]


# ----------------------------------------------------------------------------- two GPUs (NCCL)


def _two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [("allgather", "zigzag", "split"), ("allgather", "contiguous", "split"),
                                  ("ulysses", "zigzag", "split"), ("ulysses", "zigzag", "flex")],
                         ids="-".join)
def test_two_gpus_compiled_bf16(mode):
    """NCCL on two GPUs, bf16, Inductor: both modes (Ulysses on split and flex), one graph per rank
    for rounds 1..3, outputs and gradients within bf16 tolerance of the single-GPU split backend.
    One test per mode: all four in one process did not finish in 560 s on 2 x H200 (each spawned
    rank compiles the reference and every mode cold), and tools/run_gpu_tests.py runs them side by side."""
    _two_gpus()
    _spawn(_check_compiled, 2, [mode], torch.bfloat16, 2e-2, "inductor", 8, 2, 1024, 128, backend="nccl")


def _check_gpu_layouts(rank, world_size, device):
    """seq_lens (both modes) and doc_ids (Ulysses) on CUDA, compiled, bf16."""
    q_len, max_rounds, live = 1024, 3, 3
    inputs = _inputs(2, 8, 2, q_len, max_rounds, 64, torch.bfloat16, device, seed=2)
    reference = _Reference(q_len, max_rounds, inputs, compiled=True)
    seq_lens = torch.tensor([700, 301], device=device)
    doc_ids = torch.cat([torch.full((1, 300), 0), torch.full((1, 500), 1), torch.full((1, 224), -1)], 1)
    doc_ids = torch.cat([doc_ids, torch.full((1, 1024), 3)]).to(device)
    for mode, kw in (("allgather", {"seq_lens": seq_lens}), ("ulysses", {"seq_lens": seq_lens}),
                     ("ulysses", {"doc_ids": doc_ids})):
        attn = torch.compile(Eagle3ContextParallelAttention(q_len, max_rounds, mode=mode), fullgraph=True)
        got = _run_sharded(attn, inputs, live, rank, world_size, q_len, "zigzag", **kw)
        _assert_shard_matches(got, reference(live, **kw), rank, world_size, q_len, "zigzag", 2e-2,
                              f"{mode} {sorted(kw)}")


@pytest.mark.gpu
def test_two_gpus_seq_lens_and_doc_ids():
    _two_gpus()
    _spawn(_check_gpu_layouts, 2, backend="nccl")


_GPU_DRAFT_CASES = [("allgather", "zigzag", "probs", "seq_lens"), ("ulysses", "zigzag", "ids", "doc_ids"),
                    ("ulysses", "contiguous", "probs", "doc_ids")]


def _check_gpu_draft_step(rank, world_size, device, compiler="inductor", cases=_GPU_DRAFT_CASES):
    """NCCL, bf16, Inductor, FSDP2: the compiled context-parallel step against the float64
    written-out unroll (test_draft.reference_unroll) on the global batch, two batches per case,
    one graph per rank."""
    q_len, length = 512, 3
    for mode, shard_order, target, doc in cases:
        torch._dynamo.reset()
        reference = make_model(q_len=q_len, length=length, seed=14, **GPU_CFG).to(device).double()
        cfg = reference.draft_model.config
        model = _cp_draft_model(reference, mode, shard_order, device, torch.bfloat16)
        counter = GraphCounter(compiler)
        step = torch.compile(model, backend=counter, fullgraph=True)
        with watch_recompiles() as reasons:
            for seed in (11, 12):
                what = f"rank {rank} {mode}/{shard_order} target={target} {doc} seed={seed}"
                (input_ids, hidden, tgt, loss_mask), kw = _draft_batch(cfg, q_len, seed, target, doc, device)
                want = reference_unroll(reference, input_ids, hidden.double(),
                                        tgt.double() if tgt.dtype.is_floating_point else tgt, loss_mask, **kw)
                want_grads = dict(zip([n for n, p in reference.named_parameters() if p.requires_grad],
                                      grads(reference, want[0])))
                local = _local_inputs((input_ids, hidden.bfloat16(), tgt, loss_mask), q_len, world_size, rank, shard_order)
                got = step(*local, **kw)
                got.loss.backward()
                got_grads = _full_grads(model)
                model.zero_grad(set_to_none=True)
                loss_err = rel_err(got.plosses, want[1])
                acc_err = (got.acces.double() - want[2]).abs().max().item()
                grad_errs = {n: rel_err(got_grads[n], w) for n, w in want_grads.items()}
                worst = max(grad_errs, key=grad_errs.get)
                if rank == 0:
                    print(f"{what}: plosses rel err {loss_err:.1e}, acces max err {acc_err:.1e}, "
                          f"worst gradient {worst} {grad_errs[worst]:.1e}")
                assert loss_err < 1e-2, (what, loss_err)
                assert acc_err < 0.05, (what, acc_err)  # bf16 logits may flip a few near-tied argmaxes
                assert grad_errs[worst] < 5e-2, (what, worst, grad_errs[worst])
        assert (counter.graphs, reasons) == (1, []), (what, counter.graphs, reasons)


@pytest.mark.gpu
def test_two_gpus_draft_step_fsdp_compiled_bf16():
    _two_gpus()
    _spawn(_check_gpu_draft_step, 2, backend="nccl")


def _check_one_gpu_allgather(rank, world_size, device):
    """One rank: the all-gather mode's attention and draft step, compiled with Inductor, bf16."""
    _check_compiled(rank, world_size, device, [("allgather", "zigzag", "split")], torch.bfloat16, 2e-2,
                    "inductor", 8, 2, 1024, 128)
    _check_gpu_draft_step(rank, world_size, device, cases=[("allgather", "zigzag", "probs", "seq_lens")])


@pytest.mark.gpu
def test_one_gpu_allgather_draft_step_compiled_bf16():
    """The all-gather mode's CUDA path on one GPU: one NCCL rank, whose zigzag chunks are one without
    a prefix and one with (so each kernel call kind, on row slices of out/dO/lse), under Inductor,
    against the single-GPU split backend and the float64 unroll. Two GPUs are not always at hand;
    this case is. On an H200 it caught the cuDNN gradient error of Note [cuDNN in the
    context-parallel split] (k_proj 0.40 off without the backward op) that two GPUs first showed."""
    _spawn(_check_one_gpu_allgather, 1, backend="nccl")

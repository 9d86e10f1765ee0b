"""Context parallel attention (compiled_mask.distributed) against the single-process Eagle3Attention.

Each multi-rank test spawns its ranks (gloo on CPU, NCCL on two GPUs); every rank builds the same
global inputs, runs the context-parallel module on its shards and checks its rows of the output
and of the q/k/v gradients against ``Eagle3Attention(backend="split")`` on the whole inputs. The
ranks' shards partition the positions (``test_shards_partition_the_sequence``), so together they
check every element. A failing rank raises, and ``mp.spawn`` re-raises its traceback here.

CPU: ~16 s of process start-up per spawn (torch imports, two cores); compiled checks use
``aot_eager`` (dynamo + AOTAutograd trace the collectives into one fwd+bwd graph; Inductor also
compiles them on CPU, at ~100 s for the pair of ranks, too slow for CI: the GPU tests compile
with Inductor).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import rel_err

from compiled_mask import Eagle3Attention
from compiled_mask.distributed import Eagle3ContextParallelAttention, shard_positions, shard_sequence
from compiled_mask.inspect import GraphCounter, watch_recompiles

# The 2-GPU machine's NVLink multicast is off (../shared/GPU.md): every process needs these.
_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


# ----------------------------------------------------------------------------- shards, one process


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shards_partition_the_sequence(world_size, layout):
    """Every position on exactly one rank; zigzag gives each rank the same causal work."""
    q_len = 24
    shards = [shard_positions(q_len, world_size, r, layout) for r in range(world_size)]
    assert all(s.dtype == torch.int64 and s.shape == (q_len // world_size,) for s in shards)
    torch.testing.assert_close(torch.cat(shards).sort().values, torch.arange(q_len))
    causal_work = [int((s + 1).sum()) for s in shards]  # keys a rank's queries attend in round 0
    if layout == "zigzag":
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
    (lambda: shard_positions(10, 2, 0), r"layout='zigzag' cuts Q_LEN into 4 equal chunks over world_size=2 ranks, got q_len=10 \(not a multiple of 4\)"),
    (lambda: shard_positions(10, 3, 0, "contiguous"), r"got q_len=10 \(not a multiple of 3\)"),
    (lambda: shard_positions(8, 2, 2), r"rank must be an int in \[0, world_size=2\), got rank=2"),
    (lambda: shard_positions(8, 2, 0, "ring"), r"unknown layout='ring'; choose one of \['zigzag', 'contiguous'\]"),
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
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size)
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


def _run_sharded(attn, inputs, live, rank, world_size, q_len, layout, grads=True, **doc_layout):
    """The module on this rank's shards: its output and q/k/v gradients (or its output alone)."""
    q, k, v, dout = (shard_sequence(t, q_len, world_size, rank, layout) for t in inputs)
    return _output_and_grads(attn, q, k, v, dout, live, grads, doc_layout)


def _assert_shard_matches(got, want, rank, world_size, q_len, layout, tol, what):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        w = shard_sequence(w, q_len, world_size, rank, layout)
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


# (mode, layout) pairs each world size checks; Ulysses needs Hq, Hkv divisible by the world size.
_MODES = [("allgather", "zigzag"), ("allgather", "contiguous"), ("ulysses", "zigzag"), ("ulysses", "contiguous")]


def _check_eager(rank, world_size, device):
    """Both modes and layouts, a dead round, seq_lens (both modes), doc_ids (Ulysses), the errors."""
    q_len, max_rounds, live = 48, 3, 2
    inputs = _inputs(2, 8, 4, q_len, max_rounds, 16, torch.float32, device)
    reference = _Reference(q_len, max_rounds, inputs)
    want = reference(live)
    doc = _doc_layouts()
    want_seq = reference(live, seq_lens=doc["seq_lens"])
    want_doc = reference(live, grads=False, doc_ids=doc["doc_ids"])  # CPU flex has no backward
    for mode, layout in _MODES:
        attn = Eagle3ContextParallelAttention(q_len, max_rounds, mode=mode, layout=layout)
        assert torch.equal(attn.positions, shard_positions(q_len, world_size, rank, layout))
        assert attn.kv_len == max_rounds * q_len // world_size  # the local buffer's length
        run = lambda **kw: _run_sharded(attn, inputs, live, rank, world_size, q_len, layout, **kw)  # noqa: E731
        check = lambda got, want, what: _assert_shard_matches(  # noqa: E731
            got, want, rank, world_size, q_len, layout, 1e-5, f"{mode}/{layout} {what}")
        check(run(), want, "plain")
        check(run(seq_lens=doc["seq_lens"]), want_seq, "seq_lens")
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


def _check_compiled(rank, world_size, device, modes, dtype, tol, backend, Hq, Hkv, q_len, D):
    """A compiled TTT loop (rounds 1..max_rounds, fwd+bwd) per mode: one graph per rank, each step
    equal to the reference."""
    max_rounds = 3
    inputs = _inputs(1, Hq, Hkv, q_len, max_rounds, D, dtype, device, seed=1)
    reference = _Reference(q_len, max_rounds, inputs, compiled=device.type == "cuda")
    wants = [reference(live) for live in range(1, max_rounds + 1)]
    for mode, layout, attn_backend in modes:
        torch._dynamo.reset()
        counter = GraphCounter(backend)
        attn = torch.compile(
            Eagle3ContextParallelAttention(q_len, max_rounds, mode=mode, layout=layout, backend=attn_backend),
            backend=counter, fullgraph=True,
        )
        with watch_recompiles() as reasons:
            for live, want in enumerate(wants, 1):
                got = _run_sharded(attn, inputs, live, rank, world_size, q_len, layout)
                _assert_shard_matches(got, want, rank, world_size, q_len, layout, tol,
                                      f"compiled {mode}/{layout}/{attn_backend} rounds={live}")
        assert (counter.graphs, reasons) == (1, []), (mode, layout, counter.graphs, reasons)


def test_two_ranks_eager():
    _spawn(_check_eager, 2)


def test_four_ranks_eager():
    _spawn(_check_eager, 4)


def test_two_ranks_compiled_one_graph():
    modes = [("allgather", "zigzag", "split"), ("ulysses", "zigzag", "split")]
    _spawn(_check_compiled, 2, modes, torch.float32, 1e-5, "aot_eager", 4, 2, 48, 16)


# ----------------------------------------------------------------------------- the benchmark


def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "bench_distributed.py"
    spec = importlib.util.spec_from_file_location("bench_distributed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


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
def test_two_gpus_compiled_bf16():
    """NCCL on two GPUs, bf16, Inductor: both modes (Ulysses on split and flex), one graph per rank
    for rounds 1..3, outputs and gradients within bf16 tolerance of the single-GPU split backend."""
    _two_gpus()
    modes = [("allgather", "zigzag", "split"), ("allgather", "contiguous", "split"),
             ("ulysses", "zigzag", "split"), ("ulysses", "zigzag", "flex")]
    _spawn(_check_compiled, 2, modes, torch.bfloat16, 2e-2, "inductor", 8, 2, 1024, 128, backend="nccl")


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

"""The Eagle3 draft and its TTT training step (compiled_mask/draft/).

CPU: the model against an independent float64 unroll (dense attention over a growing K/V, losses
with shifted padding, as SpecForge writes them), the compiled step (one graph over steps and
batches, equal to eager), what the compiled step saves for backward (rounds, not buffers), and
tools/train.py end to end. GPU (marked gpu): one graph with each backend, and bf16 numerics.
"""

from __future__ import annotations

import copy
import doctest
import gc
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from expect import TestCase
from helpers import dense_reference_attention, eagle3_dense, rel_err
from torch._dynamo.backends.common import aot_autograd
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition

import compiled_mask.draft.model
import compiled_mask.draft.unroll
from compiled_mask import Eagle3DraftConfig, Eagle3DraftModel, Eagle3Model
from compiled_mask._fa4 import fa4_available
from compiled_mask.inspect import GraphCounter, compile_summary, watch_recompiles

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, draft_vocab_size=120, rope_theta=10000.0)


def make_model(q_len=64, length=3, backend="split", seed=0, memory="save", chunk_rows=None, **config) -> Eagle3Model:
    torch.manual_seed(seed)
    draft = Eagle3DraftModel(Eagle3DraftConfig(**{**TINY, **config}))
    for p in draft.parameters():  # norm weights away from 1, so a swapped norm shows
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p)) if p.dim() == 1 else None
    return Eagle3Model(draft, q_len, length, attention_backend=backend, memory=memory, chunk_rows=chunk_rows)


def make_batch(B, T, cfg: Eagle3DraftConfig, seed=0, ids_target=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    hidden = torch.randn(B, T, 3 * cfg.target_hidden_size, generator=g)
    if ids_target:
        target = torch.randint(-1, cfg.draft_vocab_size, (B, T), generator=g)
    else:
        target = (3 * torch.randn(B, T, cfg.draft_vocab_size, generator=g)).softmax(-1)
    loss_mask = torch.rand(B, T, generator=g) > 0.25
    return tuple(t.to(device) for t in (input_ids, hidden, target, loss_mask))


def doc_layout(B, T, seed):
    """seq_lens [B] and doc_ids [B, T]: a few documents per row, then -1 padding."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(T // 2, T + 1, (B,), generator=g)
    doc_ids = torch.full((B, T), -1)
    for b in range(B):
        cuts = sorted(torch.randint(1, int(seq_lens[b]), (3,), generator=g).tolist())
        for d, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, int(seq_lens[b])])):
            doc_ids[b, lo:hi] = d % 2  # equal ids in two runs: two documents
    return seq_lens, doc_ids


# ----------------------------------------------------------------------------- the reference


def _shift(t: torch.Tensor) -> torch.Tensor:
    """SpecForge's ``padding(t, left=False)``: drop position 0, append a zero at the end."""
    return torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], dim=1)


def _doc_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    starts = torch.zeros_like(doc_ids)
    for b in range(doc_ids.shape[0]):
        for t in range(1, doc_ids.shape[1]):
            same = doc_ids[b, t] == doc_ids[b, t - 1]
            starts[b, t] = starts[b, t - 1] if same else t
    return starts


def reference_unroll(model: Eagle3Model, input_ids, hidden_states, target, loss_mask,
                     seq_lens=None, doc_ids=None):
    """The TTT step written out the way SpecForge does it, in float64 with dense attention: K/V
    caches that grow by one round per step, the Eagle3 mask over them, inputs shifted with zero
    padding, losses as masked means. Returns (loss, plosses, acces)."""
    draft, T, N = model.draft_model, model.q_len, model.length
    cfg, layer = draft.config, draft.midlayer
    attn = layer.self_attn
    B, D, dev = input_ids.shape[0], cfg.head_dim, input_ids.device
    seq_lens, doc_ids = (None if t is None else t.cpu() for t in (seq_lens, doc_ids))
    valid = torch.ones(B, T, dtype=torch.bool)
    if seq_lens is not None:
        valid &= torch.arange(T) < seq_lens[:, None]
    if doc_ids is not None:
        valid &= doc_ids != -1
    starts = _doc_starts(doc_ids) if doc_ids is not None else torch.zeros(B, T, dtype=torch.long)
    valid, starts = valid.to(dev), starts.to(dev)
    ids_target = not target.dtype.is_floating_point
    mask = loss_mask.bool() & valid & ((target >= 0) if ids_target else True)
    # RoPE frequencies in float32, as HF's Llama (and the draft) compute them, then widened.
    inv_freq = (1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).double().to(dev)

    def rope(x, s):  # positions t + s
        freqs = (torch.arange(T, dtype=torch.float64, device=dev) + s)[:, None] * inv_freq[None]
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    hidden = draft.fc(hidden_states.double())
    ids, tgt, same_doc = input_ids, target, starts
    ks, vs, plosses, acces = [], [], [], []
    for s in range(N):
        emb = draft.embed_tokens(ids)
        x = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(hidden)], -1)
        q = rope(attn.q_proj(x).view(B, T, -1, D).transpose(1, 2), s)
        ks.append(rope(attn.k_proj(x).view(B, T, -1, D).transpose(1, 2), s))
        vs.append(attn.v_proj(x).view(B, T, -1, D).transpose(1, 2))
        allowed = eagle3_dense(T, T * (s + 1), seq_lens=seq_lens, doc_ids=doc_ids)
        out = dense_reference_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), allowed)
        h = hidden + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        hidden = h + layer.mlp(layer.post_attention_layernorm(h))
        logp = draft.compute_logits(hidden).log_softmax(-1)
        step_mask = mask & (same_doc == starts)
        if ids_target:
            nll = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
            want = tgt.clamp(min=0)
        else:
            nll, want = -(tgt * logp).sum(-1), tgt.argmax(-1)
        n = step_mask.sum().clamp(min=1)
        plosses.append((nll * step_mask).sum() / n)
        acces.append(((logp.argmax(-1) == want) & step_mask).sum().double() / n)
        ids, tgt, mask, same_doc = _shift(ids), _shift(tgt), _shift(mask), _shift(same_doc)
    plosses = torch.stack(plosses)
    weights = 0.8 ** torch.arange(N, dtype=torch.float64, device=dev)
    return (weights * plosses).sum(), plosses, torch.stack(acces)


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


# ----------------------------------------------------------------------------- CPU


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("memory", ["save", "recompute", "recompute_tiled", "staged", "staged_tiled"])
@pytest.mark.parametrize("layout", ["dense", "seq_lens", "doc_ids", "ids_target"])
def test_eager_matches_float64_reference(layout, memory):
    """The model (eager, split backend, float64, each memory policy) against the written-out
    SpecForge-style unroll with unfused logits: losses, accuracies and every parameter gradient,
    at float64 precision."""
    model = make_model(seed=1, memory=memory).double()
    cfg = model.draft_model.config
    input_ids, hidden, target, loss_mask = make_batch(2, 64, cfg, seed=2, ids_target=layout == "ids_target")
    kwargs = {}
    if layout == "seq_lens":
        kwargs = dict(seq_lens=torch.tensor([40, 64]))
    if layout == "doc_ids":
        kwargs = dict(zip(("seq_lens", "doc_ids"), doc_layout(2, 64, seed=3)))
    if target.dtype.is_floating_point:
        target = target.double()
    out = model(input_ids, hidden.double(), target, loss_mask, **kwargs)
    want = reference_unroll(model, input_ids, hidden, target, loss_mask, **kwargs)
    torch.testing.assert_close(out.plosses, want[1], rtol=1e-10, atol=0)
    torch.testing.assert_close(out.acces.double(), want[2].double(), rtol=1e-10, atol=0)  # same argmax
    torch.testing.assert_close(out.loss, want[0], rtol=1e-10, atol=0)
    for got, ref in zip(grads(model, out.loss), grads(model, want[0])):
        assert rel_err(got, ref) < 1e-9


class SavedForBackward:
    """An AOTAutograd backend (no codegen: the graphs run as traced) that records the shapes of
    the tensors each compiled graph keeps for its backward, chosen by the min-cut partitioner
    (Inductor's)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.backend = aot_autograd(fw_compiler=self._nop, bw_compiler=self._nop,
                                    partition_fn=self._partition)

    @staticmethod
    def _nop(gm, _):
        return make_boxed_func(gm.forward)

    def _partition(self, joint, inputs, **kwargs):
        fw, bw = min_cut_rematerialization_partition(joint, inputs, **kwargs)
        for node in bw.graph.nodes:
            val = node.meta.get("val")
            if node.op == "placeholder" and not node.name.startswith("tangents") and isinstance(val, torch.Tensor):
                self.shapes.append(tuple(val.shape))
        return fw, bw

    def __call__(self, gm, example_inputs):
        return self.backend(gm, example_inputs)


class TestCompiledStep(TestCase):
    def test_one_graph_equal_to_eager_saving_rounds_not_buffers(self):
        """The whole unroll, forward and backward, as one graph over three calls with two batches
        and different seq_lens values; equal to eager (losses, accuracies, gradients); and it keeps
        each K/V round for backward, never a whole [B, Hkv, Q_LEN * length, D] buffer per TTT step
        (Note [writing a round]: that would be O(length**2) memory)."""
        torch._dynamo.reset()
        model = make_model(length=3, seed=6)
        cfg = model.draft_model.config
        saved = SavedForBackward()
        counter = GraphCounter(saved)
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        calls = [(make_batch(2, 64, cfg, seed=7), torch.tensor([64, 37])),
                 (make_batch(2, 64, cfg, seed=8), torch.tensor([21, 60])),
                 (make_batch(2, 64, cfg, seed=7), torch.tensor([5, 64]))]
        with watch_recompiles() as reasons:
            for batch, seq_lens in calls:
                out = compiled(*batch, seq_lens=seq_lens)
                got = grads(model, out.loss)
                want_out = model(*batch, seq_lens=seq_lens)
                want = grads(model, want_out.loss)
                torch.testing.assert_close(out.plosses, want_out.plosses, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(out.acces, want_out.acces)
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        self.assertExpectedInline(compile_summary(counter, reasons), """\
graphs: 1
recompiles: none""")
        B, Hkv, D = 2, cfg.num_key_value_heads, cfg.head_dim
        self.assertNotIn((B, Hkv, 64 * 3, D), saved.shapes)
        self.assertLessEqual(saved.shapes.count((B, Hkv, 64, D)), 2 * 3)  # k and v of each round
        torch._dynamo.reset()


@pytest.mark.parametrize("memory", ["recompute", "recompute_tiled", "staged", "staged_tiled"])
def test_compiled_recompute_saves_no_layer_activations(memory):
    """A recomputing policy, compiled (AOTAutograd's min-cut partitioner, as Inductor's): one
    graph, equal to eager, and nothing of the decoder layer's width is kept for backward, neither
    the MLP's ``[B, T, intermediate]`` activations nor q/k/v of ``[B, H, T, D]`` beyond each
    round's K/V (Note [memory policies]); "save" keeps them (the control). (The staged policies
    run the layer inside an op, so the partitioner sees only the op's inputs.)"""
    saved_shapes = {}
    for policy in ("save", memory):
        torch._dynamo.reset()
        model = make_model(length=3, seed=6, memory=policy, intermediate_size=80)
        cfg = model.draft_model.config
        saved = SavedForBackward()
        counter = GraphCounter(saved)
        batch = make_batch(2, 64, cfg, seed=7)
        out = torch.compile(model, backend=counter, fullgraph=True)(*batch, seq_lens=torch.tensor([64, 40]))
        got = grads(model, out.loss)
        want_out = model(*batch, seq_lens=torch.tensor([64, 40]))
        torch.testing.assert_close(out.plosses, want_out.plosses, rtol=1e-5, atol=1e-6)
        for g, w in zip(got, grads(model, want_out.loss)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        assert counter.graphs == 1
        saved_shapes[policy] = saved.shapes
    mlp = (2 * 64, 80)  # [B * T, intermediate], as the partitioner keeps it
    assert mlp in saved_shapes["save"]  # the control: "save" keeps the MLP's activations
    assert mlp not in saved_shapes[memory] and (2, 64, 80) not in saved_shapes[memory]
    assert sum(torch.Size(s).numel() for s in saved_shapes[memory]) < sum(
        torch.Size(s).numel() for s in saved_shapes["save"]) / 2
    torch._dynamo.reset()


@pytest.mark.parametrize("memory", ["staged", "staged_tiled"])
def test_staged_ops_compile_the_layer_halves(memory, monkeypatch):
    """The staged ops with the layer's two halves compiled by Inductor (around the eager K/V
    buffer; ``staged._COMPILED_ON``, on CPU here), float64: the step equals "save" (losses,
    accuracies, every gradient), and each half compiles once for the forward op and once for the
    backward op's replay, for all TTT steps and both calls."""
    from compiled_mask.draft import staged

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(staged, "_COMPILED_ON", ("cpu",))
    model, ref = (make_model(seed=1, memory=m).double() for m in (memory, "save"))
    cfg = model.draft_model.config
    for seed in (2, 3):
        input_ids, hidden, target, loss_mask = make_batch(2, 64, cfg, seed=seed)
        batch = (input_ids, hidden.double(), target.double(), loss_mask)
        with watch_recompiles() as reasons:
            out = model(*batch, seq_lens=torch.tensor([64, 41]))
            got = grads(model, out.loss)
        want = ref(*batch, seq_lens=torch.tensor([64, 41]))
        torch.testing.assert_close(out.plosses, want.plosses, rtol=1e-10, atol=0)
        torch.testing.assert_close(out.acces, want.acces)
        for g, w in zip(got, grads(ref, want.loss)):
            assert rel_err(g, w) < 1e-9
        assert len(reasons) == (2 if seed == 2 else 0), reasons  # each half: no_grad, then grad
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    torch._dynamo.reset()


def test_staged_halves_compile_once_under_an_outer_compile(monkeypatch):
    """The whole step under torch.compile with the layer's halves compiled inside the staged ops
    (as on CUDA): one graph for the step and one per half and grad mode, at every later step too
    (the ops run the layer with the same dispatch keys at each call, ``_autograd_dispatch``), and
    the compiled step's loss and gradients equal the eager step's."""
    from compiled_mask.draft import staged

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(staged, "_COMPILED_ON", ("cpu",))
    model = make_model(length=3, seed=4, memory="staged").double()
    cfg = model.draft_model.config
    step = torch.compile(model, fullgraph=True)
    for seed in (5, 6, 7):
        input_ids, hidden, target, loss_mask = make_batch(1, 64, cfg, seed=seed)
        batch = (input_ids, hidden.double(), target.double(), loss_mask)
        out = step(*batch)
        got = grads(model, out.loss)
    want = model(*batch)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-10, atol=0)
    for g, w in zip(got, grads(model, want.loss)):
        assert rel_err(g, w) < 1e-9
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 5
    torch._dynamo.reset()


def test_staged_backward_replays_each_step_in_its_op():
    """memory="staged", compiled: the backward graph holds one staged_step_backward per TTT step,
    each fed by the gradient the next step's returns (so no replay can run early), and none of
    the layer's own work (no MLP-wide matmul: the replay is inside the ops); the ops pass
    torch.library.opcheck (schema, fake, autograd registration, AOT dispatch); the backward works
    under a TorchDispatchMode; autocast and double backward are refused; a deep copy runs on its
    own."""
    torch._dynamo.reset()
    length, inter = 3, 80
    model = make_model(length=length, seed=6, memory="staged", intermediate_size=inter)
    model.draft_model.freeze_embedding()  # a weight the ops take but return no gradient for
    cfg = model.draft_model.config
    graphs = []

    def partition(joint, inputs, **kwargs):
        fw, bw = min_cut_rematerialization_partition(joint, inputs, **kwargs)
        graphs.append(bw)
        return fw, bw

    nop = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    backend = aot_autograd(fw_compiler=nop, bw_compiler=nop, partition_fn=partition)
    batch = make_batch(2, 64, cfg, seed=7)
    out = torch.compile(model, backend=backend, fullgraph=True)(*batch)
    got = grads(model, out.loss)
    want = grads(model, model(*batch).loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    (bw,) = graphs
    steps = [n for n in bw.graph.nodes if n.target is torch.ops.compiled_mask.staged_step_backward.default]
    assert len(steps) == length
    def ancestors(node):
        seen, todo = set(), [node]
        while todo:
            for a in todo.pop().all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    todo.append(a)
        return seen

    d_hidden = [ancestors(n.args[1]) for n in steps]  # what each op's d_hidden is computed from
    assert [sum(other in deps for other in steps) for deps in d_hidden] == list(range(length))  # a chain
    widths = {n.meta["val"].shape[-1] for n in bw.graph.nodes
              if n.op == "call_function" and n.target in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)}
    assert inter not in widths

    from compiled_mask.draft import staged

    ids, hidden = batch[0], torch.randn(2, 64, cfg.hidden_size)
    cos, sin = model.draft_model.rope_cos_sin(torch.arange(64), hidden.dtype)
    rounds = [torch.randn(2, cfg.num_key_value_heads, 64, cfg.head_dim) for _ in range(2)]
    weights = [p.detach().requires_grad_(p.requires_grad) for _, p in model._staged_params()]
    args = (model._staged_key, ids, hidden.requires_grad_(), cos, sin, None, False, torch.tensor(2), rounds[:1],
            rounds[1:], weights, [w.requires_grad for w in weights])
    torch.library.opcheck(staged._staged_step, args)
    torch._dynamo.reset()

    # Under a TorchDispatchMode the backward op's replay still records autograd.
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with PassThrough():
        got = grads(model, model(*batch).loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="where autocast does not reach"), torch.autocast("cpu", torch.bfloat16):
        model(*batch)
    with pytest.raises(RuntimeError, match=r"head_loss has no double backward"):  # the last step's loss: first
        torch.autograd.grad(model(*batch).loss, [p for p in model.parameters() if p.requires_grad], create_graph=True)
    with pytest.raises(RuntimeError, match=r"the staged ops have no double backward"):
        torch.autograd.grad(staged._staged_step(*args)[0].sum(), hidden, create_graph=True)

    # A deep copy finds its own layer once the original is gone (the ops look models up by key).
    copied = copy.deepcopy(model)
    assert copied._staged_key != model._staged_key
    del model
    gc.collect()
    copied(*batch).loss.backward()


class TestNames(TestCase):
    def test_state_dict_uses_specforge_names(self):
        """The keys (and shapes) of SpecForge's LlamaForCausalLMEagle3, so its checkpoints load."""
        draft = Eagle3DraftModel(Eagle3DraftConfig(**TINY))
        text = "\n".join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                         for k, v in draft.state_dict().items())
        self.assertExpectedInline(text, """\
t2d (300,) bool
d2t (120,) int64
embed_tokens.weight (300, 64) float32
fc.weight (64, 192) float32
midlayer.self_attn.q_proj.weight (64, 128) float32
midlayer.self_attn.k_proj.weight (32, 128) float32
midlayer.self_attn.v_proj.weight (32, 128) float32
midlayer.self_attn.o_proj.weight (64, 64) float32
midlayer.mlp.gate_proj.weight (96, 64) float32
midlayer.mlp.up_proj.weight (96, 64) float32
midlayer.mlp.down_proj.weight (64, 96) float32
midlayer.hidden_norm.weight (64,) float32
midlayer.input_layernorm.weight (64,) float32
midlayer.post_attention_layernorm.weight (64,) float32
norm.weight (64,) float32
lm_head.weight (120, 64) float32""")


def test_train_script_loss_falls():
    """tools/train.py with tiny flags: the progress lines, and a last line that says the loss fell."""
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--q-len", "32", "--batch", "2",
           "--ttt-steps", "2", "--steps", "40", "--hidden", "32", "--intermediate", "64",
           "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--draft-vocab", "32",
           "--batches", "4", "--lr", "1e-2", "--compiler", "aot_eager"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert any(line.startswith("compiling the training step (first step only") for line in lines)
    assert any(re.search(r"\] 40/40  loss \d+\.\d+  acc/step [\d./]+  [\d,]+ tok/s$", line) for line in lines)
    last = re.fullmatch(r"trained 40 steps: loss (\d+\.\d+) -> (\d+\.\d+), graphs compiled: (\d+)", lines[-1])
    assert last, lines[-1]
    first, final, graphs = float(last[1]), float(last[2]), int(last[3])
    assert graphs == 1
    assert final < first - 0.5, (first, final)  # clearly falling (it starts near 2 * ln 32 = 6.1)


def test_input_errors_name_the_fix():
    model = make_model()
    cfg = model.draft_model.config
    input_ids, hidden, target, loss_mask = make_batch(1, 64, cfg)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\] with T = q_len = 64"):
        model(input_ids[:, :32], hidden, target, loss_mask)
    with pytest.raises(ValueError, match=r"3 \* target_hidden_size = 192"):
        model(input_ids, hidden[..., :64], target, loss_mask)
    with pytest.raises(ValueError, match=r"float target must be \[B, T, draft_vocab_size\]"):
        model(input_ids, hidden, target[..., :10], loss_mask)
    with pytest.raises(ValueError, match=r"multiple of num_key_value_heads"):
        Eagle3DraftConfig(**{**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match=r"length must be an int >= 1"):
        Eagle3Model(model.draft_model, 64, 0)
    with pytest.raises(ValueError, match=r"seq_lens/doc_ids have batch 2 but input_ids has batch 1"):
        model(input_ids, hidden, target, loss_mask, seq_lens=torch.tensor([64, 3]))
    with pytest.raises(ValueError, match=r"doc_ids must be an int tensor \[B, Q_LEN\], got shape \(1, 64\) and dtype torch.float32"):
        model(input_ids, hidden, target, loss_mask, doc_ids=torch.zeros(1, 64))
    with pytest.raises(ValueError, match=r"only the 'split' backend .* got attention_backend='flex'"):
        Eagle3Model(model.draft_model, 64, 3, attention_backend="flex", memory="staged")
    with pytest.raises(ValueError, match=r"unknown memory='stage'; choose 'auto' or one of"):
        Eagle3Model(model.draft_model, 64, 3, memory="stage")


def test_auto_memory_policy_by_q_len():
    """memory="auto": "save" up to 16384 tokens, "recompute" up to 65536, then "staged_tiled" (one
    process, split) or "recompute_tiled" (another backend or sequence strategy, where an explicit
    staged policy is refused), which is also what a call with doc_ids on CUDA gets (the staged
    policies cannot take them there); an explicit staged policy refuses that call, and a refusal
    names what auto chose."""
    draft = Eagle3DraftModel(Eagle3DraftConfig(**TINY))
    chosen = {(T, backend): Eagle3Model(draft, T, 7, attention_backend=backend).memory
              for T in (16384, 16385, 65536, 65537) for backend in ("split", "flex")}
    assert chosen == {(16384, "split"): "save", (16384, "flex"): "save", (16385, "split"): "recompute",
                      (16385, "flex"): "recompute", (65536, "split"): "recompute", (65536, "flex"): "recompute",
                      (65537, "split"): "staged_tiled", (65537, "flex"): "recompute_tiled"}

    class Elsewhere:  # a sequence strategy other than the whole sequence in this process
        def __init__(self):
            self.whole = compiled_mask.draft.unroll.WholeSequence()

        def bind(self, *args):
            return self.whole.bind(*args)

    assert Eagle3Model(draft, 65537, 7, sequence=Elsewhere()).memory == "recompute_tiled"
    with pytest.raises(ValueError, match=r"memory='staged' runs on one process; with context parallel use"):
        Eagle3Model(draft, 64, 3, memory="staged", sequence=Elsewhere())
    auto, explicit = Eagle3Model(draft, 65537, 7), Eagle3Model(draft, 64, 3, memory="staged")
    docs, cuda, cpu = torch.zeros(1, 4, dtype=torch.int64), torch.device("cuda"), torch.device("cpu")
    assert [auto._call_policy(d, dev) for d, dev in ((docs, cuda), (None, cuda), (docs, cpu))] == [
        "recompute_tiled", "staged_tiled", "staged_tiled"]
    assert [explicit._call_policy(d, dev) for d, dev in ((None, cuda), (docs, cpu))] == ["staged", "staged"]
    with pytest.raises(ValueError, match=r"memory='staged' runs the attention eagerly, and with doc_ids on CUDA"):
        explicit._call_policy(docs, cuda)
    with torch.autocast("cpu", torch.bfloat16):
        assert auto._call_policy(None, cpu) == "recompute_tiled"
        with pytest.raises(ValueError, match=r"memory='staged' runs each step's layer inside an op, where autocast"):
            explicit._call_policy(None, cpu)


def test_vocab_mapping_round_trip():
    draft = Eagle3DraftModel(Eagle3DraftConfig(**TINY))
    kept = torch.randperm(300)[:120].sort().values
    draft.set_vocab_mapping(kept)
    assert torch.equal(draft.d2t + torch.arange(120), kept)  # SpecForge's d2t: an offset
    assert draft.t2d.sum() == 120 and draft.t2d[kept].all()
    target_ids = torch.tensor([[int(kept[5]), -1, int(kept[119])]])
    missing = int(torch.nonzero(~draft.t2d)[0])
    target_ids = torch.cat([target_ids, torch.tensor([[missing]])], dim=1)
    assert draft.target_to_draft_ids(target_ids).tolist() == [[5, -1, 119, -1]]


def test_docstring_example_runs():
    for module in (compiled_mask.draft.model, compiled_mask.draft.unroll):
        assert doctest.testmod(module, raise_on_error=True).attempted > 0


# ----------------------------------------------------------------------------- GPU


GPU_BACKENDS = ["split", "flex", pytest.param("fa4", marks=pytest.mark.skipif(
    not fa4_available(), reason="needs flash_attn.cute (pip install 'compiled-mask[fa4]')"))]
GPU_CFG = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=1000, draft_vocab_size=500, rope_theta=10000.0)


def _gpu_calls(cfg, T):
    calls = []
    for seed in (11, 12, 11):
        seq_lens, doc_ids = doc_layout(2, T, seed)
        batch = make_batch(2, T, cfg, seed=seed, device="cuda")
        calls.append((batch[:1] + (batch[1].bfloat16(),) + batch[2:], seq_lens.cuda(), doc_ids.cuda()))
    return calls


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_train_step_one_graph(backend):
    """bf16, fwd+bwd of the whole unroll: one graph over steps, batches and seq_lens/doc_ids
    values (plain asserts: the GPU image has no expecttest)."""
    T = 256
    model = make_model(q_len=T, length=3, backend=backend, seed=13, **GPU_CFG).cuda().bfloat16()
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with watch_recompiles() as reasons:
        for batch, seq_lens, doc_ids in _gpu_calls(model.draft_model.config, T):
            out = compiled(*batch, seq_lens=seq_lens, doc_ids=doc_ids)
            out.loss.backward()
            assert torch.isfinite(out.plosses).all()
    assert compile_summary(counter, reasons) == "graphs: 1\nrecompiles: none"


def _float64_reference(model, T, documents=True):
    """The first of :func:`_gpu_calls` (without its doc_ids unless ``documents``) and the float64
    written-out unroll of ``model`` on it (the model is left in float64):
    ``(inputs, seq_lens, doc_ids, (loss, plosses, ...), grads)``."""
    inputs, seq_lens, doc_ids = _gpu_calls(model.draft_model.config, T)[0]
    doc_ids = doc_ids if documents else None
    input_ids, hidden, target, loss_mask = inputs
    model.double()
    want = reference_unroll(model, input_ids, hidden.double(), target.double(), loss_mask,
                            seq_lens=seq_lens, doc_ids=doc_ids)
    return inputs, seq_lens, doc_ids, want, grads(model, want[0])


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_train_step_bf16_matches_float64(backend):
    """The compiled bf16 step against the float64 written-out unroll (same weights): losses and
    gradients, with seq_lens and doc_ids; and no worse than the eager bf16 step (split)."""
    T = 256
    model = make_model(q_len=T, length=3, backend=backend, seed=14, **GPU_CFG).cuda()
    (input_ids, hidden, target, loss_mask), seq_lens, doc_ids, want, want_grads = _float64_reference(model, T)
    model = model.bfloat16()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(input_ids, hidden, target, loss_mask, seq_lens=seq_lens, doc_ids=doc_ids)
    got_grads = grads(model, out.loss)
    loss_err = rel_err(out.plosses, want[1])
    grad_errs = [rel_err(g, w) for g, w in zip(got_grads, want_grads)]
    eager = make_model(q_len=T, length=3, backend="split", seed=14, **GPU_CFG).cuda().bfloat16()
    eager_out = eager(input_ids, hidden, target, loss_mask, seq_lens=seq_lens, doc_ids=doc_ids)
    eager_errs = [rel_err(g, w) for g, w in zip(grads(eager, eager_out.loss), want_grads)]
    print(backend, "plosses rel err", loss_err, "grads", max(grad_errs), "eager split grads", max(eager_errs))
    assert loss_err < 1e-2
    assert max(grad_errs) < 5e-2
    assert max(grad_errs) < 2 * max(eager_errs) + 1e-2


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_compile_state")
@pytest.mark.parametrize("memory", ["recompute", "recompute_tiled", "staged", "staged_tiled"])
def test_gpu_memory_policies_match_save(memory):
    """The recomputing policies, compiled in bf16 with the split backend: the same losses and
    gradients as "save" (to bf16 rounding), against the float64 unroll, one graph (the staged
    ones with seq_lens only: they refuse doc_ids on CUDA)."""
    T = 256
    model = make_model(q_len=T, length=3, seed=15, memory=memory, **GPU_CFG).cuda()
    staged = memory.startswith("staged")  # doc_ids on CUDA are refused there (flex would run eagerly)
    (input_ids, hidden, target, loss_mask), seq_lens, doc_ids, want, want_grads = _float64_reference(
        model, T, documents=not staged)
    model = model.bfloat16()
    if staged:
        docs = torch.zeros_like(input_ids)
        with pytest.raises(ValueError, match="seq_lens \\(padding\\) instead of doc_ids"):
            model(input_ids, hidden, target, loss_mask, doc_ids=docs)
    counter = GraphCounter()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = torch.compile(model, backend=counter, fullgraph=True)(input_ids, hidden, target, loss_mask,
                                                                 seq_lens=seq_lens, doc_ids=doc_ids)
    grad_errs = [rel_err(g, w) for g, w in zip(grads(model, out.loss), want_grads)]
    print(memory, "plosses rel err", rel_err(out.plosses, want[1]), "grads", max(grad_errs))
    assert rel_err(out.plosses, want[1]) < 1e-2
    assert max(grad_errs) < 5e-2
    assert counter.graphs == 1
    # the staged ops' layer halves, compiled on CUDA (staged._COMPILED_ON): each half once with
    # and once without grad
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == (5 if staged else 1)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_rows", [128, None])
@pytest.mark.parametrize("target_form", ["probs", "ids", "logits", "head"])
def test_gpu_head_loss_matches_float64(target_form, chunk_rows):
    """The fused LM head + loss on CUDA in bf16 (the Triton cross entropy), every target form,
    against its float64 reference: sums and the gradients of hidden, norm and head weights, in
    chunks smaller than the rows (the head gradient summed over six), and in the default (one
    chunk per sample)."""
    from compiled_mask.draft.loss import TargetHead, TargetLogits, _head_loss_reference, head_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    B, R, H, V = 2, 300, 256, 1000
    hidden = torch.randn(B, R, H, generator=g, device="cuda")
    norm_w = 1 + 0.1 * torch.randn(H, generator=g, device="cuda")
    head_w = torch.randn(V, H, generator=g, device="cuda") / H**0.5
    counted = torch.rand(B, R, generator=g, device="cuda") > 0.2
    logits = 3 * torch.randn(B, R, V, generator=g, device="cuda")
    targets = {"probs": logits.softmax(-1), "ids": torch.randint(-1, V, (B, R), generator=g, device="cuda"),
               "logits": TargetLogits(logits), "head": TargetHead(torch.randn(B, R, H, generator=g, device="cuda"),
                                                                  head_w.clone())}

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (hidden, norm_w, head_w)]
        target = targets[target_form]
        if isinstance(target, TargetHead):
            target = TargetHead(*(t.to(dtype) for t in target))
        elif isinstance(target, TargetLogits):
            target = TargetLogits(target.logits.to(dtype))
        elif target.dtype.is_floating_point:
            target = target.to(dtype)
        kw = {"chunk_rows": chunk_rows} if fn is head_loss else {}
        nll, hit = fn(*leaves, target, counted, eps=1e-5, **kw)
        return (nll, hit, *torch.autograd.grad(nll, leaves))

    got, want = run(head_loss, torch.bfloat16), run(_head_loss_reference, torch.float64)
    assert rel_err(got[0], want[0]) < 1e-2
    assert abs(got[1].item() - want[1].item()) <= 2  # hits: bf16 near-ties
    for name, x, w in zip(("hidden", "norm_weight", "head_weight"), got[2:], want[2:]):
        assert rel_err(x, w) < 3e-2, (name, rel_err(x, w))

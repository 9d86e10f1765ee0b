"""The one command, end to end on CPU (tools/train.py --target-model, compiled_mask/draft/pipeline.py):
a tiny Llama target and tokenizer made here, a few dozen conversations in both JSON-lines shapes,
packed rows, the vocabulary map, training with the step compiled as one graph (aot_eager), the
loss falling, checkpoints, a killed run resumed to the same bits, the export reloaded strictly to
the same outputs, tau > 1 on held-out conversations, offline mode's first loss equal to online's,
and the errors a user meets (malformed data, a damaged checkpoint, other settings on resume)."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
import tiny_target  # noqa: E402
from helpers import load_tool  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_target import one_thread  # noqa: E402, F401 (fixture)

from compiled_mask.draft.checkpoint import load_checkpoint  # noqa: E402
from compiled_mask.draft.evaluate import draft_chain  # noqa: E402
from compiled_mask.draft.export import load_draft  # noqa: E402

STEPS = 60


def _train(argv):
    """tools/train.py main(argv) in this process: ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = load_tool("train").main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    target = tiny_target.cached_target(tmp_path_factory.getbasetemp())
    data = tiny_target.write_jsonl(base / "chat.jsonl", tiny_target.conversations(56, seed=1), "mixed")
    flags = ["--target-model", target, "--data", data, "--q-len", 64, "--batch", 2, "--ttt-steps", 3,
             "--steps", STEPS, "--lr", 3e-3, "--draft-vocab", 64, "--compiler", "aot_eager",
             "--save-every", 20, "--eval-tokens", 24]
    return {"base": base, "flags": flags, "data": data}


def _log(directory):
    return [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]


def _with(flags, **changes):
    flags = list(flags)
    for name, value in changes.items():
        flags[flags.index("--" + name.replace("_", "-")) + 1] = value
    return flags


def test_train_checkpoint_resume_export_tau(tiny):
    """One test, so the runs share one process (xdist): the uninterrupted run, then a killed and
    resumed one, then the errors of a damaged checkpoint and of other settings."""
    run = tiny["base"] / "a"
    code, out, err = _train([*tiny["flags"], "--output-dir", run])
    assert code == 0, err[-3000:]
    lines = out.strip().splitlines()
    assert re.fullmatch(r"target: .*tiny-target \(LlamaForCausalLM, 4 layers, hidden 64, vocabulary 128, "
                        r"float32\); auxiliary layers \[1, 1, 0\]", lines[0]), lines[0]
    assert re.fullmatch(r"data: .*chat.jsonl: 56 conversations \(56 lines\); 8 held out for evaluation", lines[1])
    assert lines[2] == "draft vocabulary: the 64 most frequent assistant tokens cover 100.0% of them"
    rows = re.fullmatch(r"rows: 48 conversations in (\d+) rows of 64 positions \(packed, (\d+\.\d)% of "
                        r"positions hold tokens\)", lines[3])
    assert rows and int(rows[1]) < 20 and float(rows[2]) > 85, lines[3]  # packed, little padding
    assert "compiled in" in out and "(1 graph)" in out  # the whole step, one graph
    assert re.search(rf"\] {STEPS}/{STEPS}  loss \d+\.\d+  acc/step [\d./]+  [\d,]+ tok/s", out)
    loss = re.search(r"^loss (\d+\.\d+) -> (\d+\.\d+) \(first and last 3 steps averaged\)", out, re.M)
    assert float(loss[2]) < float(loss[1]) - 4, loss[0]  # it starts near 3 x ln 64 ~ 10
    last = re.fullmatch(r"draft exported to (.*): acceptance length tau (\d+\.\d+) \(k=3\), \d+ s", lines[-1])
    assert last, lines[-1]
    draft_dir, tau = run / "draft", float(last[2])
    assert last[1] == str(draft_dir)
    assert tau > 1.3, tau  # an untrained draft gets ~1.0
    log = _log(run)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, STEPS + 1))
    assert log[-1]["tau"] == pytest.approx(tau, abs=0.005)
    assert (run / "train_curves.png").stat().st_size > 1000

    # The export reloads strictly, equal to the final checkpoint, with the same outputs.
    state, _ = load_checkpoint(run / "checkpoints")
    assert state["step"] == STEPS
    exported, cfg = load_draft(draft_dir)
    assert cfg["max_position_embeddings"] >= 64 and cfg["draft_vocab_size"] == 64
    target_weights = load_file(str(tiny["flags"][1] / "model.safetensors"))
    assert torch.equal(exported.embed_tokens.weight, target_weights["model.embed_tokens.weight"])  # frozen, the target's
    assert exported.state_dict().keys() == state["draft"].keys()
    for k, v in exported.state_dict().items():
        assert torch.equal(v, state["draft"][k]), k
    aux, ids = torch.randn(12, 3 * 64), torch.randint(128, (12,))
    fresh, _ = load_draft(draft_dir)
    assert torch.equal(draft_chain(exported, aux, ids, 3)[0], draft_chain(fresh, aux, ids, 3)[0])

    # Fine-tuning from the export starts where the run ended, not from scratch.
    code, out, err = _train([*_with(tiny["flags"], steps=2, compiler="none", eval_tokens=1),
                             "--output-dir", tiny["base"] / "ft", "--init-from", draft_dir])
    assert code == 0, err[-3000:]
    assert _log(tiny["base"] / "ft")[0]["loss"] < log[0]["loss"] - 4

    # Killed after step 30 (checkpoint 20 written), resumed: the same run, bit for bit.
    b = tiny["base"] / "b"
    code, out, err = _train([*tiny["flags"], "--output-dir", b, "--stop-after", 30])
    assert code == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == "stopped after step 30 (--stop-after)"
    assert not (b / "draft").exists() and (b / "checkpoints" / "latest").read_text().strip() == "step-00000020"
    code, out, err = _train([*tiny["flags"], "--output-dir", b, "--resume"])
    assert code == 0, err[-3000:]
    assert f"resumed from {b / 'checkpoints'} at step 20" in out
    a_log, b_log = _log(run), _log(b)
    assert [r["step"] for r in b_log] == [r["step"] for r in a_log]  # steps 21..30 logged once
    for ra, rb in zip(a_log, b_log):  # every loss, accuracy, gradient norm and tau: the same bits
        assert {k: v for k, v in ra.items() if k not in ("tok_s", "time_s")} == \
            {k: v for k, v in rb.items() if k not in ("tok_s", "time_s")}
    wa, wb = load_file(str(draft_dir / "model.safetensors")), load_file(str(b / "draft" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # A damaged latest checkpoint: a clear error naming the earlier one, which is kept.
    state_pt = run / "checkpoints" / "step-00000060" / "state.pt"
    state_pt.write_bytes(state_pt.read_bytes()[:1000])
    code, out, err = _train([*tiny["flags"], "--output-dir", run, "--resume"])
    err = err.strip().splitlines()[-1]  # after transformers' weight-loading progress bar
    earlier = run / "checkpoints" / "step-00000040"
    assert code == 1 and err.startswith(f"train.py: error: checkpoint {run}/checkpoints/step-00000060 cannot be "
                                        f"resumed: state.pt has 1000 bytes"), err
    assert f"The earlier checkpoint {earlier} is intact and was kept: resume from it with --resume {earlier}" in err
    assert earlier.is_dir() and state_pt.exists()
    # Other settings than the checkpoint's: refused, naming them.
    code, out, err = _train([*_with(tiny["flags"], lr=1e-3), "--output-dir", run, "--resume", earlier])
    assert code == 1 and "the checkpoint was made with other settings (checkpoint, now): {'lr': (0.003, 0.001)}" in err
    # A fingerprint key differs: named by itself, not as the whole fingerprint.
    code, out, err = _train([*tiny["flags"], "--skip-malformed", "--output-dir", run, "--resume", earlier])
    assert code == 1 and "(checkpoint, now): {'skip_malformed': (False, True)}; resume" in err, err[-2000:]


def test_offline_first_step_loss_equals_online(tiny):
    flags = [*_with(tiny["flags"], steps=1, compiler="none", eval_tokens=1), "--eval-conversations", 1]
    code, out, err = _train([*flags, "--output-dir", tiny["base"] / "online"])
    assert code == 0, err[-3000:]
    code, out, err = _train([*flags, "--output-dir", tiny["base"] / "offline", "--offline"])
    assert code == 0, err[-3000:]
    features = tiny["base"] / "offline" / "features"
    index = json.loads((features / "index.json").read_text())
    assert index["q_len"] == 64 and index["rows"] > 0 and (features / "shard-00000.safetensors").exists()
    assert "offline features: " in out and ", offline" in out
    assert _log(tiny["base"] / "offline")[0]["loss"] == _log(tiny["base"] / "online")[0]["loss"]


def test_malformed_data_names_file_and_line(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = tiny["data"].read_text().splitlines()
    bad.write_text("\n".join(good[:2] + ['{"messages": [{"role": "user", "content": "hi"}'] + good[2:6]) + "\n")
    flags = _with(tiny["flags"], data=bad)
    code, out, err = _train([*flags, "--output-dir", tmp_path / "o"])
    assert code == 1 and out == ""  # before the target is loaded
    assert err.strip() == (f"train.py: error: {bad}:3: not valid JSON (Expecting ',' delimiter at column 48). "
                           f"Fix the line, or pass --skip-malformed to skip such lines.")
    flags = _with(flags, steps=1, compiler="none")
    code, out, err = _train([*flags, "--output-dir", tmp_path / "o", "--skip-malformed", "--eval-conversations", 0])
    assert code == 0, err[-2000:]
    assert re.search(r"^data: .*bad.jsonl: 6 conversations \(7 lines; skipped 1 malformed \(not valid JSON: "
                     r"1\)\); 0 held out for evaluation$", out, re.M), out
    # a directory that is not a model: one line, no traceback
    code, out, err = _train([*_with(tiny["flags"], target_model=tmp_path), "--output-dir", tmp_path / "o"])
    assert code == 1 and err.strip() == (f"train.py: error: --target-model {tmp_path}: no config.json there; pass "
                                         f"a local Hugging Face model directory (e.g. one saved by save_pretrained "
                                         f"or `huggingface-cli download`).")


def test_fingerprint_names_the_draft_vocabulary(tmp_path):
    """Features and checkpoints are keyed by the draft vocabulary's ids, not only its size: the
    stored head rows and the positions that count depend on them (an --init-from draft
    re-exported to the same path has other ids)."""
    from types import SimpleNamespace

    from compiled_mask.draft.pipeline import RunConfig, _fingerprint

    (tmp_path / "chat.jsonl").write_text("{}\n")
    config = RunConfig(target_model=str(tmp_path), data=str(tmp_path / "chat.jsonl"), output_dir=str(tmp_path))
    target = SimpleNamespace(aux_layers=(1, 2, 3))
    a = _fingerprint(config, target, torch.tensor([0, 5, 9]))
    b = _fingerprint(config, target, torch.tensor([0, 5, 8]))
    assert a["draft_vocab_size"] == b["draft_vocab_size"] == 3
    assert a != b and a == _fingerprint(config, target, torch.tensor([0, 5, 9]))

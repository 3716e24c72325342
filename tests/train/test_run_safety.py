"""Issue 17: bad input refused before --out is touched, --overwrite only removes runs, NaN recovery that can be
followed, --resume that refuses another model / recipe / data, atomic run directories."""

import json

import pytest
import torch

import linearize
from linearize.cli import main
from linearize.errors import LinearizeError, ModelFileError, TrainingDivergedError
from linearize.models import rundir
from linearize.train import loop, run_recipe
from lz_train_helpers import random_data, tiny_gemma3, tiny_llama, tiny_recipe

SETS = tiny_recipe(**{"stage1.max_steps": 4, "stage2.max_steps": 4})


def _records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A tiny base model on disk, so the command line can name it."""
    path = tmp_path_factory.mktemp("base") / "tiny"
    tiny_llama().save_pretrained(path)
    return path


# -- 1: --overwrite ---------------------------------------------------------------------------------

def test_overwrite_validates_first_and_never_removes_what_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "x"
    (out / "projectX").mkdir(parents=True)
    (out / "projectX" / "important.txt").write_text("keep")
    # a typo in the model name: refused before anything in --out is touched
    assert main(["convert", "--model", "gemma3-270mm", "--preset", "cpu", "--out", str(out), "--overwrite"]) == 2
    assert "unknown model" in _error_line(capsys)
    assert (out / "projectX" / "important.txt").read_text() == "keep"
    # a valid run: still refused, the directory holds no run of this tool
    with pytest.raises(LinearizeError, match=r"does not hold a linearize run \(no \.linearize-run\)"):
        run_recipe(tiny_llama(), "la-only", out, overrides=tiny_recipe(), data=random_data(), overwrite=True)
    assert (out / "projectX" / "important.txt").read_text() == "keep"


# -- 8: every user error is one line, exit 2, before --out exists -------------------------------------

@pytest.mark.parametrize("setting, message", [
    ("stage1.lr=abc", "stage1.lr must be a finite number"),
    ("data.seq_len=abc", "data.seq_len must be an integer"),
    ("stage1.betas=5", "stage1.betas must be a list"),
    ("stage1=3", "stage1 is a section"),
    ("eval.modes=hybrid", "eval.modes must be a list"),
    ("stage1.lr=.nan", "stage1.lr must be a finite number"),
    ("data.sources=dolly", "data.sources must be a list"),
    ("data.sources=[dolly, nosuchsource]", "Unknown data source 'nosuchsource'"),
])
def test_bad_settings_are_one_line_errors_before_out_exists(hf_model_dir, tmp_path, capsys, setting, message):
    out = tmp_path / "out"
    assert main(["convert", "--model", str(hf_model_dir), "--preset", "cpu", "--out", str(out), "--set", setting]) == 2
    assert message in _error_line(capsys)
    assert not out.exists()


# -- 2: NaN / inf at the step that produced it; the advice works ---------------------------------------

def test_a_poisoning_update_is_caught_before_its_checkpoint(tmp_path):
    """Steps 1-2 leave w alone (zero gradient); step 3's update at lr 1e37 leaves w finite but ~1e37, so the
    loss after it is inf. The checkpoint of step 3 must not be written: step 2's stays the last good one."""
    from accelerate import Accelerator

    w = torch.nn.Parameter(torch.ones(2))
    net = torch.nn.Module()
    net.w = w

    def loss_fn(batch, ctx):
        return (w * w).sum() * (1.0 if ctx["step"] >= 2 else 0.0), {}

    spec = loop.LoopSpec(name="stage1", lr=1e37, batch_size=1, grad_accum=1, epochs=10, checkpoint_every=1, grad_clip=None)
    trainer = loop.Trainer(model=net, params={"w": w}, data=torch.zeros(8, 2, dtype=torch.long), loss_fn=loss_fn,
                           spec=spec, ckpt_dir=tmp_path, accelerator=Accelerator(cpu=True),
                           log=loop.JsonlLog(tmp_path / "log.jsonl"), show_progress=False)
    with pytest.raises(TrainingDivergedError, match=r"stage1 step 3: the loss after the update is inf.*--resume --set stage1.lr="):
        trainer.run()
    ckpt = torch.load(tmp_path / loop.CHECKPOINT, weights_only=False)
    assert ckpt["step"] == 2 and torch.equal(ckpt["params"]["w"], torch.ones(2))


def test_resume_may_lower_the_learning_rate_and_logs_it(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(loop.RunInterrupted):
        run_recipe(tiny_llama(), "ssd", out, overrides=SETS, data=random_data(), interrupt_after=3)
    with pytest.raises(LinearizeError, match=r"not data.seq_len \(1024 -> 16\)"):  # never the data
        run_recipe(tiny_llama(), None, out, overrides=["data.seq_len=16"], data=random_data(), resume=True)
    run_recipe(tiny_llama(), None, out, overrides=["stage1.lr=0.001", "stage2.max_steps=3"], data=random_data(),
               resume=True)
    records = _records(out)
    [change] = [r for r in records if r.get("event") == "recipe_changed"]
    assert change["changes"] == {"stage1.lr": [0.01, 0.001], "stage2.max_steps": [4, 3]}
    rates = {r["step"]: r["lr"] for r in records if r.get("stage") == "stage1" and "lr" in r}
    assert rates[2] == pytest.approx(0.01) and rates[3] == rates[4] == pytest.approx(0.001)
    assert max(r["step"] for r in records if r.get("stage") == "stage2" and "loss" in r) == 3
    assert linearize.load(out) is not None


def test_a_diverged_but_finite_run_is_marked(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # confidently wrong: a validation loss far above ln(vocab)
    summary = run_recipe(model, "la-only", tmp_path / "run", overrides=tiny_recipe(**{"stage1.max_steps": 1}),
                         data=random_data())
    assert summary["warnings"] and "diverged" in summary["warnings"][0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"] == summary["warnings"]


# -- 7 and 9: --resume ---------------------------------------------------------------------------------

def test_resume_refuses_another_model_recipe_or_an_empty_directory(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(loop.RunInterrupted):
        run_recipe(tiny_llama(), "ssd", out, overrides=SETS, data=random_data(), interrupt_after=2)
    manifest = (out / "data_manifest.json").read_bytes()
    with pytest.raises(LinearizeError, match="run of model LlamaForCausalLM, not Gemma3ForCausalLM"):
        run_recipe(tiny_gemma3(), None, out, data=random_data(), resume=True)
    with pytest.raises(LinearizeError, match="run of recipe ssd, not lolcats"):
        run_recipe(tiny_llama(), "lolcats", out, data=random_data(), resume=True)
    assert (out / "data_manifest.json").read_bytes() == manifest
    for empty in (tmp_path / "missing", tmp_path):
        with pytest.raises(LinearizeError, match="holds no run to resume"):
            run_recipe(tiny_llama(), None, empty / "sub" if empty == tmp_path else empty, data=random_data(),
                       resume=True)
    with pytest.raises(LinearizeError, match="training data differ"):
        run_recipe(tiny_llama(), None, out, data=random_data(seed=1), resume=True)


def test_a_resumed_run_logs_the_base_evaluation_once(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(loop.RunInterrupted):
        run_recipe(tiny_llama(), "ssd", out, overrides=SETS, data=random_data(), interrupt_after=3)
    summary = run_recipe(tiny_llama(), "ssd", out, data=random_data(), resume=True)
    base = [r for r in _records(out) if r.get("stage") == "base"]
    assert len(base) == 1 and summary["val_base"] == base[0]["val"]


# -- 6: atomic run directories --------------------------------------------------------------------------

def test_a_run_killed_while_saving_does_not_load_until_resumed(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def killed(out_dir, staging):
        (staging / "config.json").replace(out_dir / "config.json")  # half moved into place
        raise loop.RunInterrupted("killed while saving")

    monkeypatch.setattr(rundir, "publish", killed)
    with pytest.raises(loop.RunInterrupted):
        run_recipe(tiny_llama(), "la-only", out, overrides=tiny_recipe(**{"stage1.max_steps": 2}), data=random_data())
    monkeypatch.undo()
    for half in (out, out / rundir.STAGING):
        with pytest.raises(ModelFileError, match="unfinished linearize run"):
            linearize.load(half)
    run_recipe(tiny_llama(), None, out, data=random_data(), resume=True)
    assert not (out / rundir.STAGING).exists() and (out / rundir.COMPLETE_MARKER).is_file()
    assert linearize.is_converted(linearize.load(out))


def test_runs_written_before_markers_load_when_complete(tmp_path):
    out = tmp_path / "old"
    run_recipe(tiny_llama(), "la-only", out, overrides=tiny_recipe(**{"stage1.max_steps": 1}), data=random_data())
    for marker in (rundir.RUN_MARKER, rundir.COMPLETE_MARKER):
        (out / marker).unlink()
    linearize.load(out)  # complete: summary.json was written last
    (out / "summary.json").unlink()
    with pytest.raises(ModelFileError, match="stopped before writing summary.json"):
        linearize.load(out)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_weights_are_one_line_errors(tmp_path, damage):
    path = tmp_path / "m"
    linearize.convert(tiny_llama()).save_pretrained(path)
    weights = path / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="no weights" if damage == "missing" else "is truncated") as info:
        linearize.load(path)
    assert "\n" not in str(info.value)

"""Issue 20 (lever 4): a conversion carried to another machine. A run cut mid-stage-2 is packed into size-limited
parts, restored into another directory beside another copy of its base model, and resumed there: the same weights,
adapter and training log as the run that was never cut. A finished run's pack restores a model that gives the same
logits. Bad packs are refused in one line before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import linearize
from linearize.cli import main
from linearize.errors import LinearizeError, ModelFileError
from linearize.models import loading, rundir
from linearize.models.runpack import manifest_path, pack_run, part_path, unpack_run
from linearize.train import loop, run_recipe
from lz_train_helpers import random_data, tiny_llama, tiny_recipe, word_tokenizer

SETS = tiny_recipe(**{"stage1.max_steps": 2, "stage1.checkpoint_every": 1, "stage2.max_steps": 4,
                      "stage2.checkpoint_every": 2, "eval.modes": "[hybrid]", "stage2.early_stopping.metric": "hybrid"})
CUT_AFTER = 4  # optimizer steps: stage 1's two, then two of stage 2 (its checkpoint at step 2)
PART_MB = 0.015  # 15 KiB: the tiny run's checkpoints need several parts
TIMING = ("tokens_per_s",)  # the only values of the log that depend on the clock


@pytest.fixture(scope="module", autouse=True)
def random_bases_load():
    """The tiny random bases load from disk like a real one; their greedy text is degenerate, so load_base's check
    of a mis-loaded model is off for this module."""
    patch = pytest.MonkeyPatch()
    patch.setattr(loading, "check_not_degenerate", lambda *args: None)
    yield
    patch.undo()


def _save_base(path: Path, seed: int = 0) -> Path:
    tiny_llama(seed).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def _run(base: Path, out: Path, **kwargs):
    resume = kwargs.pop("resume", False)
    return run_recipe(str(base), None if resume else "ssd", out, overrides=None if resume else SETS,
                      data=random_data(), resume=resume, **kwargs)


def _log(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if r.get("event") != "resumed"]


@pytest.fixture(scope="module")
def machine_a(tmp_path_factory):
    """The first machine: a base model and the run that was never cut."""
    root = tmp_path_factory.mktemp("machine_a")
    base = _save_base(root / "base")
    _run(base, root / "whole")
    return root


@pytest.fixture(scope="module")
def pack_of_whole(machine_a, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "whole.tar.gz"
    pack_run(machine_a / "whole", out, part_mb=PART_MB)
    return out


def _machine_b(tmp_path: Path, machine_a: Path) -> Path:
    """Another machine: the same base model at another path."""
    base = tmp_path / "elsewhere" / "base-copy"
    shutil.copytree(machine_a / "base", base)
    return base


def test_a_cut_run_resumes_on_another_machine_to_the_same_weights_and_log(machine_a, tmp_path):
    cut = tmp_path / "a" / "run"
    with pytest.raises(loop.RunInterrupted):
        _run(machine_a / "base", cut, interrupt_after=CUT_AFTER)
    assert torch.load(cut / "checkpoints" / "stage2" / loop.CHECKPOINT, weights_only=False)["step"] == 2
    (tmp_path / "carry").mkdir()
    assert main(["pack-run", str(cut), str(tmp_path / "carry" / "run"), "--part-mb", str(PART_MB)]) == 0
    manifest = json.loads(manifest_path(tmp_path / "carry" / "run").read_text())
    assert not manifest["run"]["complete"] and len(manifest["parts"]) >= 2
    # the finished stage 1 travels as its final parameters alone; the cut stage 2 as its last checkpoint
    assert [f for f in manifest["run"]["files"] if f.startswith("checkpoints/")] == [
        "checkpoints/stage1/final.pt", "checkpoints/stage2/checkpoint.pt"]
    shutil.rmtree(tmp_path / "a")  # nothing of the first machine's run directory is read again

    base_b = _machine_b(tmp_path, machine_a)
    restored = tmp_path / "b" / "run"
    (tmp_path / "b").mkdir()
    unpack_run([manifest_path(tmp_path / "carry" / "run")], restored, model=base_b)
    assert rundir.read_run_marker(restored)["model"] == str(base_b.resolve())
    _run(base_b, restored, resume=True)

    whole = machine_a / "whole"
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        got, want = load_file(str(restored / name)), load_file(str(whole / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert _log(restored) == _log(whole)
    assert (restored / "tokenizer.json").is_file() and (restored / rundir.COMPLETE_MARKER).is_file()


def test_a_finished_run_restored_gives_the_same_logits(machine_a, pack_of_whole, tmp_path):
    manifest = json.loads(manifest_path(pack_of_whole).read_text())
    packed = set(manifest["run"]["files"])
    # what resuming needs and cannot be derived again; no weights, adapter or tokenizer copy
    assert {rundir.RUN_MARKER, "recipe.yaml", "data_manifest.json", "train_log.jsonl",
            "checkpoints/stage1/final.pt", "checkpoints/stage2/final.pt"} <= packed
    assert not any(name.endswith((".safetensors", "tokenizer.json", "config.json", ".png")) for name in packed)
    assert manifest["run"]["complete"]

    base_b = _machine_b(tmp_path, machine_a)
    restored = tmp_path / "restored"
    assert main(["unpack-run", str(part_path(pack_of_whole, 1)), "--out", str(restored), "--model", str(base_b)]) == 0
    with pytest.raises(ModelFileError, match="unfinished linearize run"):  # no model files until the resume
        linearize.load(restored)
    _run(base_b, restored, resume=True)  # the stages are done: it rebuilds the model and the tokenizer from the base

    ids = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = linearize.load(restored)(ids).logits
        want = linearize.load(machine_a / "whole")(ids).logits
    assert torch.equal(got, want)
    assert (restored / "tokenizer.json").read_bytes() == (machine_a / "whole" / "tokenizer.json").read_bytes()


def test_the_folder_holding_a_pack_names_it(pack_of_whole, tmp_path):
    from linearize.models.runpack import find_manifest

    assert find_manifest([pack_of_whole.parent]) == manifest_path(pack_of_whole)  # the study's packs/NAME/
    assert find_manifest([part_path(pack_of_whole, 0)]) == manifest_path(pack_of_whole)
    with pytest.raises(LinearizeError, match="a folder of 0 pack manifests"):
        find_manifest([tmp_path])


def test_parts_respect_the_size_limit(machine_a, pack_of_whole):
    manifest = json.loads(manifest_path(pack_of_whole).read_text())
    limit = int(PART_MB * 2**20)
    sizes = [part_path(pack_of_whole, i).stat().st_size for i in range(len(manifest["parts"]))]
    assert len(sizes) >= 3 and max(sizes) <= limit and sizes[:-1] == [limit] * (len(sizes) - 1)
    assert sum(sizes) == manifest["archive"]["bytes"]
    assert not part_path(pack_of_whole, len(sizes)).exists()


def _copy_pack(pack: Path, into: Path) -> Path:
    into.mkdir()
    for f in pack.parent.iterdir():
        if f.name.startswith(pack.name):
            shutil.copy(f, into / f.name)
    return into / pack.name


def _refused(args: list[str], capsys, message: str) -> None:
    capsys.readouterr()  # what came before (progress bars of saving a model)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err


def test_bad_packs_are_refused_before_anything_is_written(machine_a, pack_of_whole, tmp_path, capsys):
    base = str(machine_a / "base")
    out = tmp_path / "out"

    missing = _copy_pack(pack_of_whole, tmp_path / "missing")
    part_path(missing, 1).unlink()
    parts = len(json.loads(manifest_path(missing).read_text())["parts"])
    _refused(["unpack-run", str(manifest_path(missing)), "--out", str(out)], capsys,
             f"1 of the pack's {parts} parts are missing beside whole.tar.gz.manifest.json: {part_path(missing, 1).name}")

    damaged = _copy_pack(pack_of_whole, tmp_path / "damaged")
    data = bytearray(part_path(damaged, 2).read_bytes())
    data[100] ^= 1
    part_path(damaged, 2).write_bytes(bytes(data))
    _refused(["unpack-run", str(damaged), "--out", str(out)], capsys,
             f"{part_path(damaged, 2).name} does not match its sha256")

    other_base = _save_base(tmp_path / "other-base", seed=1)
    _refused(["unpack-run", str(pack_of_whole), "--out", str(out), "--model", str(other_base)], capsys,
             "is not the run's base")

    taken = tmp_path / "taken"
    (taken / "notes").mkdir(parents=True)
    _refused(["unpack-run", str(pack_of_whole), "--out", str(taken), "--model", base], capsys, "exists")
    assert [p.name for p in taken.iterdir()] == ["notes"]

    _refused(["pack-run", str(machine_a / "whole"), str(pack_of_whole)], capsys, "exists")
    _refused(["pack-run", str(machine_a / "base"), str(tmp_path / "p")], capsys, "does not hold a linearize run")
    of_an_object = tmp_path / "object-run"  # a run of a model object records only its class
    of_an_object.mkdir()
    rundir.write_run_marker(of_an_object, "LlamaForCausalLM", "ssd")
    _refused(["pack-run", str(of_an_object), str(tmp_path / "p")], capsys,
             "the run's base model 'LlamaForCausalLM' is not a short name or a path on this machine; pass --model")
    assert not out.exists() and not list(tmp_path.glob(".out.unpacking*")) and not list(tmp_path.glob("p.*"))
    with pytest.raises(LinearizeError, match="the pack.s manifest .* is missing"):
        unpack_run([tmp_path / "nothing.tar.gz"], out)
    assert not out.exists()


def test_the_base_fingerprint_is_the_model_files_not_their_place(machine_a, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(machine_a / "base", copy)
    (copy / "NOTES.md").write_text("a note beside the model")
    assert loading.base_fingerprint(copy) == loading.base_fingerprint(machine_a / "base")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 7}))
    assert loading.base_fingerprint(copy) != loading.base_fingerprint(machine_a / "base")

"""``zoo export`` end to end on a tiny teacher: fit, export the run directory, reload with the student's
heldout KL; bad input ends in one line (exit 2); a LoRA fit also writes a PEFT adapter (issue 15)."""
from __future__ import annotations

import json

import torch

import zoo
from recipes.recipe import load_recipe
from zoo.core.losses import token_kl
from zoo.core.surgery import teacher_view
from zoo_cli import repair_model, write_config, zoo_cli


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    message = err[err.index("zoo: error: "):]
    assert len(message.strip().splitlines()) == 1, message
    for needle in needles:
        assert needle in message, err


def heldout_kl(student, teacher_module, datamodule) -> float:
    """Token-weighted KL(teacher || ``student``) over the recipe's heldout split, as validation computes it."""
    total = count = 0.0
    for batch in datamodule.val_dataloader():
        ids, attn, mask = batch["input_ids"], batch.get("attention_mask"), batch.get("loss_mask")
        with torch.no_grad(), teacher_view(teacher_module.model):
            teacher = teacher_module.model(input_ids=ids, attention_mask=attn).logits
        with torch.no_grad():
            logits = student(input_ids=ids, attention_mask=attn).logits
        n = float(((mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)) & attn.bool())[:, 1:].sum())
        total += float(token_kl(teacher, logits, mask, attn)) * n
        count += n
    return total / count


def test_fit_export_and_reload_reproduce_the_heldout_kl(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir)
    assert zoo_cli(["fit", "--config", config], capsys)[0] == 0
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    # a validate of the run in between (the README's order) leaves the run's recipe as the fit wrote it
    assert zoo_cli(["validate", "--config", config, "--ckpt_path", str(run)], capsys)[0] == 0
    code, out, err = zoo_cli(["export", "--run", str(run), "--output", str(tmp_path / "export")], capsys)
    assert code == 0, err
    assert "x the teacher's parameters" in out
    final = json.loads((run / "metrics.json").read_text())["final"]["heldout_kl"]
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"{final:.6g}" in card
    loaded = load_recipe(config)
    module, data = loaded.module, loaded.data
    data.setup("validate")
    loaded = zoo.from_pretrained(tmp_path / "export")
    assert abs(heldout_kl(loaded, module, data) - final) < 1e-4 * max(1.0, final)


def test_export_bad_inputs_end_in_one_line(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir, max_steps=2)
    assert zoo_cli(["fit", "--config", config], capsys)[0] == 0
    run, out = tmp_path / "run", tmp_path / "export"
    state = str(run / "repair_state.safetensors")
    code, _, err = zoo_cli(["export", "--recipe", config, "--repair_state", state, "--output", str(out),
                            "--overrides", '["--model.init_args.parts.rank", "4"]'], capsys)
    assert_clean_error(code, err, "does not match this run", '"rank": 8', '"rank": 4')
    assert not out.exists()
    assert zoo_cli(["export", "--run", str(run), "--output", str(out)], capsys)[0] == 0
    assert_clean_error(*_code_err(zoo_cli(["export", "--run", str(run), "--output", str(out)], capsys)),
                       "exists; pass --overwrite")
    assert zoo_cli(["export", "--run", str(run), "--output", str(out), "--overwrite", "true"], capsys)[0] == 0
    assert_clean_error(*_code_err(zoo_cli(["export", "--run", str(tmp_path / "nope"), "--output", "x"], capsys)),
                       "nope", "does not exist")
    assert_clean_error(*_code_err(zoo_cli(["export", "--run", str(run), "--output", str(tmp_path / "m"),
                                           "--merge", "true"], capsys)), "--merge refused", "FisherSVDLinear")
    code, out_text, err = zoo_cli(["export", "--help"], capsys)
    assert code == 0 and "--merge" in out_text and "--run" in out_text


def _code_err(result):
    return result[0], result[2]


LORA = repair_model("zoo.LoRA", **{"targets": "model.layers.*.self_attn.{q,v}_proj", "rank": 4, "lr": 0.01}, **{"objective": "next_token"})


def test_lora_fit_writes_a_peft_adapter_that_peft_loads_offline(tmp_path, tiny_teacher_dir, capsys):
    from peft import AutoPeftModelForCausalLM

    config = write_config(tmp_path, tiny_teacher_dir, model=json.loads(json.dumps(LORA)), max_steps=3)
    assert zoo_cli(["fit", "--config", config], capsys)[0] == 0
    adapter = tmp_path / "run" / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(__import__("pathlib").Path(tiny_teacher_dir).resolve())
    assert (adapter / "adapter_model.safetensors").is_file() and tiny_teacher_dir in (adapter / "README.md").read_text()
    module = load_recipe(config, repair_state=str(tmp_path / "run" / "repair_state.safetensors")).module
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
    ids = torch.randint(3, 380, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        with teacher_view(module.model):  # the adapter is trained: not the base model
            assert not torch.allclose(module.model(input_ids=ids).logits, expected)


def test_export_of_a_train_factors_run_reads_its_state_alone(tmp_path, tiny_teacher_dir, capsys, monkeypatch):
    """A repair that trained every tensor of its low-rank layers (``train_factors``) is exported from its state:
    no calibration, no Cholesky or SVD (they would raise here), the ranks the data allocated read from the
    state's shapes; the export computes what the calibrated rebuild with the state loaded computes."""
    import zoo.core.calibration as calibration

    model = repair_model("zoo.FisherSVD", targets="model.layers.{0..1}.mlp.{down,up}_proj", rank=0.5,
                         allocation="global", train_factors=True, lr=0.01)
    config = write_config(tmp_path, tiny_teacher_dir, model=model, max_steps=3)
    assert zoo_cli(["fit", "--config", config], capsys)[0] == 0
    state = str(tmp_path / "run" / "repair_state.safetensors")
    reference = load_recipe(config, build=False)
    reference.module.repair_state = state
    reference.module.build_student_from(reference.data)  # calibrated and factorized, then the state loaded
    ranks = {n: m.replacement.rank for n, m in reference.module.model.named_modules() if hasattr(m, "replacement")}
    assert len(set(ranks.values())) > 1  # the global allocation gave the targets different ranks

    def refuse(*args, **kwargs):
        raise AssertionError("calibration or a factorization ran")

    for owner, name in ((calibration, "collect"), (torch.linalg, "svd"), (torch.linalg, "cholesky"),
                        (torch.linalg, "cholesky_ex"), (torch.linalg, "eigh")):
        monkeypatch.setattr(owner, name, refuse)
    code, out, err = zoo_cli(["export", "--run", str(tmp_path / "run"), "--output", str(tmp_path / "export")], capsys)
    assert code == 0 and "rebuilt from its repair state alone" in err, err
    exported = zoo.from_pretrained(tmp_path / "export")
    ids = torch.randint(3, 380, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, reference.module.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_a_state_without_its_frozen_factors_says_why_it_calibrates(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir, max_steps=2)  # sigma repair: U and V stay frozen
    assert zoo_cli(["fit", "--config", config], capsys)[0] == 0
    code, _, err = zoo_cli(["export", "--run", str(tmp_path / "run"), "--output", str(tmp_path / "export")], capsys)
    assert code == 0 and "cannot rebuild the student alone" in err and "FisherSVD" in err and "frozen" in err, err

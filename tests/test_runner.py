"""Experiment runner: config validation, run directory, resume after interruption, sweeps, report."""

import json
import os

import numpy as np
import pytest
import yaml
from flax import nnx
from qjax.experiments import runner
from qjax.experiments.config import ConfigError, load_config

from qjax.__main__ import main as cli
from qjax.data import ByteTokenizer, austen, windows
from qjax.eval import perplexity
from qjax.models import load_pretrained
from qjax.models.export import save_llama
from qjax.models.llama import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    save_llama(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), str(d), dtype="float32")
    return str(d)


def _config(tmp_path, model_dir, **extra):
    cfg = {
        "name": "t",
        "output_dir": str(tmp_path / "runs"),
        "model": {"source": model_dir, "tokenizer": "bytes"},
        "data": {"corpus": "austen", "split": "test", "seq_len": 32, "max_windows": 4, "batch_size": 2, "calibration_windows": 2},
        "recipes": [
            {"name": "float"},
            {"name": "w8a8", "save": True,
             "steps": [{"quantize": {"rules": [{"weight": {"format": "int8"}, "act": {"format": "int8", "granularity": "token"}}]}}]},
            {"name": "w4 static", "steps": [{"quantize": {"rules": [
                {"weight": {"format": "int4", "granularity": "group", "group_size": 16},
                 "act": {"format": "int8", "granularity": "tensor"}, "static_act": True}]}}]},
        ],
    }  # fmt: skip
    cfg.update(extra)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_config_errors_name_the_key_and_the_file(tmp_path, tiny_model_dir):
    path = _config(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match=r"cfg.yaml: unknown key 'data.seqlen'"):
        load_config(path, ["data.seqlen=3"])
    with pytest.raises(ConfigError, match=r"'data.seq_len' must be int, got str"):
        load_config(path, ["data.seq_len=long"])
    with pytest.raises(ConfigError, match=r"'recipes.1.steps.0.quantize.rules.0.weight.format' must be str"):
        load_config(path, ["recipes.1.steps.0.quantize.rules.0.weight.format=8"])
    with pytest.raises(ConfigError, match=r"cfg.yaml: unknown step 'smoothquant2' at 'recipes.1.steps.0'"):
        load_config(path, ["recipes.1.steps=[{smoothquant2: {}}]"])
    with pytest.raises(ConfigError, match=r"cfg.yaml: recipes.1.steps.0.quantize: mode must be one of"):
        load_config(path, ["recipes.1.steps.0.quantize.mode=bogus"])
    with pytest.raises(ConfigError, match=r"cfg.yaml: recipes.1.steps.0.quantize.rules.0.weight: unknown granularity 'row'"):
        load_config(path, ["recipes.1.steps.0.quantize.rules.0.weight.granularity=row"])
    with pytest.raises(ConfigError, match=r"repeated: \['float'\]"):
        load_config(path, ["recipes.1.name=float"])
    raw = yaml.safe_load(open(path))
    del raw["name"]
    (tmp_path / "noname.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        load_config(str(tmp_path / "noname.yaml"))
    assert cli(["run", path, "data.batch_size=1.5"]) == 2


def test_run_writes_a_complete_run_directory(tmp_path, tiny_model_dir):
    cfg, raw = load_config(_config(tmp_path, tiny_model_dir))
    rows = runner.run(cfg, raw, progress=False)
    run_dir = tmp_path / "runs" / "t"
    for f in ("config.yaml", "env.json", "metrics.jsonl", "summary.md", "summary.csv", "ppl_vs_memory.png"):
        assert (run_dir / f).exists(), f
    model, _ = load_pretrained(tiny_model_dir)
    w = windows(ByteTokenizer().encode(austen("test")), 32, max_windows=4)
    np.testing.assert_allclose(rows[0]["perplexity"], perplexity(model, w, progress=False), rtol=1e-6)
    assert rows[1]["weight_MB"] < rows[0]["weight_MB"] and rows[2]["weight_MB"] < rows[1]["weight_MB"]
    assert "| w8a8 |" in (run_dir / "summary.md").read_text()
    # the saved quantized model restores and reproduces the recorded perplexity
    import qjax

    template = qjax.quantize(model, cfg.recipes[1].steps[0].config.recipe(), "ptq")
    restored = qjax.restore_model(template, run_dir / "checkpoints" / "w8a8")
    np.testing.assert_allclose(perplexity(restored, w, batch_size=2, progress=False), rows[1]["perplexity"], rtol=1e-9)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, tiny_model_dir, monkeypatch):
    cfg, raw = load_config(_config(tmp_path, tiny_model_dir, name="full"))
    full = runner.run(cfg, raw, progress=False)

    cfg2, raw2 = load_config(_config(tmp_path, tiny_model_dir, name="interrupted"))
    real = runner.run_steps
    calls = []

    def flaky(model, steps, ctx, **k):
        calls.append(ctx.label)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-run, after the first recipe was recorded
        return real(model, steps, ctx, **k)

    monkeypatch.setattr(runner, "run_steps", flaky)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg2, raw2, progress=False)
    metrics = tmp_path / "runs" / "interrupted" / "metrics.jsonl"
    assert len(runner.read_metrics(str(metrics))) == 1
    with open(metrics, "a") as f:
        f.write('{"recipe": "w8a8", "perpl')  # a torn line from a crash during the write
    monkeypatch.setattr(runner, "run_steps", lambda model, steps, ctx, **k: (calls.append(ctx.label), real(model, steps, ctx, **k))[1])
    resumed = runner.run(cfg2, raw2, progress=False)
    assert calls[2:] == ["w8a8", "w4 static"]  # the finished recipe was not recomputed
    assert [r["perplexity"] for r in resumed] == pytest.approx([r["perplexity"] for r in full], rel=1e-9)
    with pytest.raises(ConfigError, match="different config"):
        runner.run(*load_config(_config(tmp_path, tiny_model_dir, name="interrupted"), ["data.max_windows=3"]), progress=False)


def test_sweep_runs_the_grid_and_prints_one_table(tmp_path, tiny_model_dir, capsys):
    path = _config(tmp_path, tiny_model_dir, name="sw")
    assert cli(["run", path, "recipes=[{name: f}]", "--sweep", "data.seq_len=16,32"]) == 0
    out = capsys.readouterr().out
    assert "| data.seq_len=16 | f |" in out and "| data.seq_len=32 | f |" in out
    dirs = sorted(os.listdir(tmp_path / "runs"))
    assert dirs == ["sw--data_seq_len_16", "sw--data_seq_len_32"]
    table = runner.report([str(tmp_path / "runs" / d) for d in dirs], str(tmp_path / "cmp.png"))
    assert table.count("/f |") == 2 and (tmp_path / "cmp.png").exists()
    page = tmp_path / "results.md"
    assert cli(["publish", str(tmp_path / "runs" / dirs[0]), str(page), "--command", "qjax run cfg.yaml"]) == 0
    text = page.read_text()
    assert "command: `qjax run cfg.yaml`" in text and "device: cpu" in text and "| f |" in text
    assert (tmp_path / "results.png").exists()
    ppl = [json.loads(open(tmp_path / "runs" / d / "metrics.jsonl").readline())["perplexity"] for d in dirs]
    assert ppl[0] != ppl[1]


def test_qat_finetuning_resumes_from_its_latest_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    from qjax.experiments import finetune as ft

    rules = [{"weight": {"format": "int4", "granularity": "group", "group_size": 16}, "act": {"format": "int8", "granularity": "token"}}]
    recipe = {"name": "w4a8 qat", "steps": [{"quantize": {"rules": rules, "mode": "qat"}},
                                            {"finetune": {"steps": 6, "learning_rate": 3e-3, "batch_size": 2, "checkpoint_every": 2}},
                                            {"quantize": {"mode": "ptq"}}]}  # fmt: skip
    cfg, raw = load_config(_config(tmp_path, tiny_model_dir, name="ft-full", recipes=[recipe]))
    (full,) = runner.run(cfg, raw, progress=False)
    assert full["finetune_loss_last"] < full["finetune_loss_first"]

    cfg2, raw2 = load_config(_config(tmp_path, tiny_model_dir, name="ft-cut", recipes=[recipe]))
    real_batch = ft.batch_at
    seen = []

    def killed_at_step_3(tokens, step, *a):
        if step == 3:
            raise KeyboardInterrupt
        seen.append(step)
        return real_batch(tokens, step, *a)

    monkeypatch.setattr(ft, "batch_at", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg2, raw2, progress=False)
    (ckpts,) = (tmp_path / "runs" / "ft-cut" / "cache").glob("*.work")  # the finetune step's private directory
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2"]
    monkeypatch.setattr(ft, "batch_at", lambda tokens, step, *a: (seen.append(step), real_batch(tokens, step, *a))[1])
    (resumed,) = runner.run(cfg2, raw2, progress=False)
    assert seen == [0, 1, 2, 2, 3, 4, 5]  # steps 0-1 checkpointed at 2; step 2 was lost with the interrupt and redone
    assert resumed["finetune_loss_last"] == pytest.approx(full["finetune_loss_last"], rel=1e-6)
    assert resumed["perplexity"] == pytest.approx(full["perplexity"], rel=1e-6)


def test_shared_prefixes_are_computed_once_and_runs_resume_mid_pipeline(tmp_path, tiny_model_dir, monkeypatch):
    from qjax.experiments import finetune as ft

    rules = [{"weight": {"format": "int4", "granularity": "group", "group_size": 16}, "act": {"format": "int8", "granularity": "token"}}]
    prefix = [{"quantize": {"rules": rules, "mode": "qat"}}, {"finetune": {"steps": 3, "learning_rate": 3e-3, "batch_size": 2}}]
    recipes = [{"name": "qat→ptq", "steps": prefix + [{"quantize": {"mode": "ptq"}}]},
               {"name": "qat→serve", "steps": prefix + [{"quantize": {"mode": "serve"}}]}]  # fmt: skip
    cfg, raw = load_config(_config(tmp_path, tiny_model_dir, name="shared", recipes=recipes))
    real_finetune = ft.finetune
    trained = []
    monkeypatch.setattr(ft, "finetune", lambda model, *a, **k: (trained.append(1), real_finetune(model, *a, **k))[1])
    rows = runner.run(cfg, raw, progress=False)
    assert len(trained) == 1  # the second recipe reused the cached [quantize, finetune] prefix
    assert rows[0]["perplexity"] == pytest.approx(rows[1]["perplexity"], rel=1e-3)  # same weights, fake vs int arithmetic
    assert os.listdir(tmp_path / "runs" / "shared" / "cache") == []  # nothing kept once every recipe finished

    # killed during evaluation: the rerun starts from the cached model after the last conversion step
    cfg2, raw2 = load_config(_config(tmp_path, tiny_model_dir, name="mid", recipes=recipes[:1]))
    import qjax.eval as qe

    real_ppl = qe.perplexity
    monkeypatch.setattr(qe, "perplexity", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg2, raw2, progress=False)
    monkeypatch.setattr(qe, "perplexity", real_ppl)
    trained.clear()
    (resumed,) = runner.run(cfg2, raw2, progress=False)
    assert trained == []  # no step before evaluate ran again
    assert resumed["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=1e-6)


def test_requantizing_uses_the_new_rules(tiny_model_dir):
    import qjax
    import qjax.numerics as qn

    model, _ = load_pretrained(tiny_model_dir)
    w8 = qjax.Rule(r"layers\..*", weight=qn.QuantSpec("int8", qn.per_axis(1)))
    a8 = qjax.Rule(r"layers\..*", weight=qn.QuantSpec("int8", qn.per_axis(1)), act=qn.QuantSpec("int8", qn.per_token()))
    qat = qjax.quantize(model, [qjax.Rule(r"layers\..*", weight=qn.QuantSpec("int4", qn.per_axis(1)))], "qat")
    again = qjax.quantize(qat, [a8], "ptq")  # float weights: the new rule wins
    ops = qjax.transforms.quantized_ops(again)
    assert all(op.rule == a8 for op in ops.values()) and ops["layers.0.mlp.up_proj"].kernel.get_value().format.name == "int8"
    packed = qjax.quantize(model, [w8], "ptq")
    same_weights = qjax.quantize(packed, [a8], "ptq")  # packed weights kept: same weight spec, activations added
    op = qjax.transforms.quantized_ops(same_weights)["layers.0.mlp.up_proj"]
    assert op.rule.act is not None
    np.testing.assert_array_equal(np.asarray(op.kernel.get_value().values),
                                  np.asarray(qjax.transforms.quantized_ops(packed)["layers.0.mlp.up_proj"].kernel.get_value().values))
    with pytest.raises(ValueError, match="already packed"):
        qjax.quantize(packed, [qjax.Rule(r"layers\..*", weight=qn.QuantSpec("int4", qn.per_axis(1)))], "ptq")


def test_a_step_that_cannot_apply_fails_before_any_work_and_keeps_the_run(tmp_path, tiny_model_dir):
    cfg, raw = load_config(_config(tmp_path, tiny_model_dir, name="checked"))
    runner.run(cfg, raw, progress=False)
    run_dir = tmp_path / "runs" / "checked"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "env.json"}
    bad = [{"name": "float"}, {"name": "osplus", "steps": [{"os_plus": {"shift": "on"}}]}]  # RMSNorm: no bias for the shift
    path = _config(tmp_path, tiny_model_dir, name="checked2", recipes=bad)
    with pytest.raises(ConfigError, match=r"recipe 'osplus', step 0 \(os_plus\): os_plus: shift='on'"):
        runner.run(*load_config(path), progress=False)
    assert not (tmp_path / "runs" / "checked2").exists()  # nothing written for a run that cannot start
    assert cli(["run", path]) == 2
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "env.json"}
    assert after == before


@pytest.mark.parametrize("name", ["quickstart", "outliers", "outliers_duquant_ablation", "weight_ptq"])
def test_shipped_configs_load_and_every_step_fits_the_embedded_model(name):
    # the real-model configs run as written; with model.source=embedded they also fit the shipped model
    path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.yaml")
    cfg, _ = load_config(path, ["model.source=embedded"])
    runner.check_steps(cfg, load_pretrained(runner.embedded_model_dir())[0], path)

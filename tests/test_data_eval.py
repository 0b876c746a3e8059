"""GGUF loading (a file written with the gguf package), tokenizers, corpora/windows, sharded loading, evaluation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

import qjax.data as qd  # noqa: E402
import qjax.models as qm  # noqa: E402
from qjax.eval import embedding_fidelity, multiple_choice_accuracy, perplexity  # noqa: E402
from qjax.eval.metrics import token_nll  # noqa: E402
from qjax.models.gguf import load_gguf  # noqa: E402

TEXT = "it is a truth universally acknowledged that a single man in possession of a good fortune must be in want of a wife. " * 20


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _permute_qk(w, n_head):
    """llama.cpp's conversion-time permutation (what convert_hf_to_gguf.py applies)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_llama_with_tokenizer_matches_transformers(tmp_path):
    tok = _bpe_tokenizer()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5)  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_block_count(2), w.add_context_length(128), w.add_embedding_length(64), w.add_feed_forward_length(96)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2"), w.add_token_list(tokens), w.add_token_merges(merges)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(2):
        for hf_name, g in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            t = _permute_qk(t, 4) if g == "attn_q" else _permute_qk(t, 2) if g == "attn_k" else t
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    model, qcfg, qtok = load_gguf(tmp_path / "m.gguf")
    text = "a single man in possession of a good fortune"
    ids = qtok.encode(text)
    np.testing.assert_array_equal(ids, tok.encode(text).ids)
    assert qtok.decode(ids) == text
    with torch.no_grad():
        ref = hf(torch.tensor(ids[None].astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids[None]))), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_gguf(tmp_path / "bad.gguf")


def test_tokenizer_json_directory_and_byte_tokenizer(tmp_path):
    tok = _bpe_tokenizer()
    tok.enable_padding(length=128)  # like all-MiniLM's tokenizer.json: qjax must switch it off
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = qd.load_tokenizer(str(tmp_path))
    ids = loaded.encode("a good fortune")
    assert len(ids) < 128 and loaded.decode(ids) == "a good fortune"
    bt = qd.ByteTokenizer()
    s = "Persuasion — 1818 ✓"
    assert bt.decode(bt.encode(s)) == s and bt.encode(s).max() < 256
    with pytest.raises(FileNotFoundError):
        qd.load_tokenizer(str(tmp_path / "nope"))


def test_corpus_windows_and_calibration_sampler(tmp_path):
    test, train = qd.austen("test"), qd.austen("train")
    assert test.startswith("Persuasion") and "Persuasion" not in train[:200] and len(train) > 5 * len(test)
    toks = np.arange(10_000)
    w = qd.windows(toks, 2048)
    assert w.shape == (4, 2048) and w[1, 0] == 2048  # ⌊T/L⌋ non-overlapping windows
    assert qd.windows(toks, 2048, stride=1024).shape == (8, 2048)  # starts 0, 1024, ..., 7168
    c1 = qd.calibration_windows(toks, 8, 128, jax.random.key(0))
    c2 = qd.calibration_windows(toks, 8, 128, jax.random.key(0))
    np.testing.assert_array_equal(c1, c2)
    assert np.all(np.diff(c1, axis=1) == 1)
    (tmp_path / "t.txt").write_text("hello")
    assert qd.load_text(str(tmp_path / "t.txt")) == "hello"
    with pytest.raises(FileNotFoundError, match="unknown corpus"):
        qd.load_text("no_such_corpus")
    with pytest.raises(ValueError, match="fewer than one window"):
        qd.windows(np.arange(10), 2048)


def _tiny_llama(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "m")
    return hf, tmp_path / "m"


def test_perplexity_matches_torch_cross_entropy(tmp_path):
    hf, path = _tiny_llama(tmp_path)
    model, _ = qm.load_pretrained(path)
    w = np.random.default_rng(0).integers(0, 97, (3, 17))
    with torch.no_grad():
        logits = hf(torch.tensor(w[:, :-1])).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), torch.tensor(w[:, 1:]).reshape(-1))
    np.testing.assert_allclose(perplexity(model, w, batch_size=2, progress=False), float(torch.exp(nll)), rtol=1e-4)
    with pytest.raises(ValueError, match="windows"):
        perplexity(model, np.arange(5), progress=False)


def test_sharded_loading_places_parameters_on_the_mesh(tmp_path):
    hf, path = _tiny_llama(tmp_path)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))

    def sharding_fn(name, shape):
        if name.endswith("kernel") and shape[-1] % 4 == 0:
            return NamedSharding(mesh, P(None, "model"))
        return NamedSharding(mesh, P())

    model, _ = qm.load_pretrained(path, sharding_fn=sharding_fn)
    kernel = model.layers[0].mlp.up_proj.kernel[...]
    assert kernel.sharding.spec == P(None, "model") and len(kernel.addressable_shards) == 8
    ids = np.random.default_rng(1).integers(0, 97, (2, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, rtol=1e-4, atol=1e-4)


class _CharTok:
    def encode(self, s):
        return np.frombuffer(s.encode(), np.uint8).astype(np.int32) % 97


def test_multiple_choice_scores_by_mean_option_log_likelihood(tmp_path):
    _, path = _tiny_llama(tmp_path)
    model, _ = qm.load_pretrained(path)
    tok = _CharTok()
    tasks = [{"context": "abc", "options": ["de", "xyz", "q"], "label": 0}, {"context": "hello", "options": ["!", "??"], "label": 1}]
    expected = []
    for ex in tasks:
        scores = []
        for opt in ex["options"]:
            ids = np.concatenate([tok.encode(ex["context"]), tok.encode(opt)])
            nll = np.asarray(token_nll(model, jnp.asarray(ids[None])))[0]
            scores.append(-nll[len(tok.encode(ex["context"])) - 1 :].mean())
        expected.append(int(np.argmax(scores) == ex["label"]))
    path_jsonl = tmp_path / "tasks.jsonl"
    path_jsonl.write_text("\n".join(json.dumps(t) for t in tasks))
    assert multiple_choice_accuracy(model, tok, str(path_jsonl), progress=False) == pytest.approx(np.mean(expected))


def test_embedding_fidelity():
    r = np.array([[1.0, 0.0], [0.0, 2.0]])
    c = np.array([[1.0, 1.0], [0.0, 3.0]])
    out = embedding_fidelity(r, c)
    assert out["cosine_min"] == pytest.approx(1 / np.sqrt(2)) and out["cosine_mean"] == pytest.approx((1 / np.sqrt(2) + 1) / 2)


def test_strided_perplexity_counts_every_token_once(tmp_path):
    _, path = _tiny_llama(tmp_path)
    model, _ = qm.load_pretrained(path)
    toks = np.random.default_rng(2).integers(0, 97, 41)
    nll = lambda ids: np.asarray(token_nll(model, jnp.asarray(ids[None])))[0]  # noqa: E731
    w = qd.windows(toks, 17, stride=8)  # starts 0, 8, 16, 24
    expected = np.concatenate([nll(w[0])] + [nll(x)[-8:] for x in w[1:]])
    assert len(expected) == 16 + 3 * 8
    got = perplexity(model, w, batch_size=3, progress=False, score_last=8)
    np.testing.assert_allclose(got, np.exp(expected.mean()), rtol=1e-5)

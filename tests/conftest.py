"""Tiny random models of every adapter family, and a tiny tokenizer, built in-test (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT = (
    "The quick brown fox jumps over the lazy dog. A model that is compressed should still speak.\n\n"
    " = Valkyria Chronicles = \n\n Senjo no Valkyria is a tactical role playing game developed by Sega.\n"
) * 20

VOCAB = 96


def tiny_config(family: str, hidden: int = 32, intermediate: int | None = None):
    """A config with 4 blocks, hidden 32, vocabulary VOCAB, for one adapter family. ``hidden`` and
    ``intermediate`` (default 2 * hidden; GPT-2's own 4 * hidden) resize it: 4-bit quantization
    needs linears with in_features a multiple of 64 and out_features of 32 (hidden=64 gives that)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "olmo":
        return tf.OlmoConfig(**common)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=8,
                                   sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)
    if family == "qwen3":
        return tf.Qwen3Config(**common)
    if family == "olmo2":
        return tf.Olmo2Config(**common, eos_token_id=0, pad_token_id=0)
    if family == "starcoder2":
        return tf.Starcoder2Config(**common, bos_token_id=0, eos_token_id=0)
    if family == "llava":
        vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=16, patch_size=8)
        return tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**common), image_token_index=VOCAB - 1)
    if family == "llava_next":  # any-resolution: a 16x16 base tile and 16x32 / 32x16 grids
        vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=16, patch_size=8)
        return tf.LlavaNextConfig(vision_config=vision, text_config=tf.LlamaConfig(**common),
                                  image_token_index=VOCAB - 1, image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]])
    if family == "qwen2_vl":  # its vision tokens take the vocabulary's last ids
        vision = dict(depth=1, embed_dim=16, hidden_size=hidden, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2)
        text = dict(common, bos_token_id=0, eos_token_id=0, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        return tf.Qwen2VLConfig(text_config=text, vision_config=vision, vision_end_token_id=VOCAB - 4,
                                vision_start_token_id=VOCAB - 3, video_token_id=VOCAB - 2, image_token_id=VOCAB - 1)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_inner=intermediate, n_layer=4, n_head=4,
                             n_positions=256)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma3_text", "gpt2", "llava", "llava_next",
            "qwen2_vl", "starcoder2"]
VLM_FAMILIES = ["llava", "llava_next", "qwen2_vl"]


def tiny_model(family: str = "llama", seed: int = 0, hidden: int = 32, intermediate: int | None = None):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if family in VLM_FAMILIES else AutoModelForCausalLM
    model = auto.from_config(tiny_config(family, hidden, intermediate), dtype=torch.float32)
    return model.eval()


def deep_tiny(family: str = "llama", seed: int = 0, layers: int = 8):
    """A tiny text model with more blocks (``layers``), so that choosing among them is not trivial."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    if family == "gpt2":
        cfg.n_layer = layers
    else:
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = ["sliding_attention", "full_attention"] * (layers // 2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def tiny_tokenizer(specials: tuple[str, ...] = ()):
    """A byte-level BPE trained in milliseconds on TEXT, with VOCAB entries at most; ``specials`` (a
    VLM's image tokens) take the last ids, VOCAB - len(specials) onwards."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(specials), special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=[])
    tok.train_from_iterator([TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    if specials:
        assert len(tokenizer) == VOCAB - len(specials)
        tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    return tokenizer


# A minimal chat template: lm-eval's --apply_chat_template needs one, and tiny tokenizers have none.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def tiny_processor(family: str):
    """The processor of a tiny LLaVA of ``family``: an image processor for its 16x16 tiles, the tiny
    tokenizer with ``<image>`` at the config's image token id, a chat template. (Qwen2-VL's processor
    needs torchvision, which is not installed here.)"""
    import transformers as tf

    tokenizer = tiny_tokenizer(("<image>",))
    clip = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                chat_template=CHAT_TEMPLATE)
    if family == "llava":
        images = tf.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        return tf.LlavaProcessor(images, tokenizer, **clip)
    if family == "llava_next":
        images = tf.LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                            image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]])
        return tf.LlavaNextProcessor(images, tokenizer, **clip)
    raise ValueError(family)


def saved_vlm_dir(path: Path, family: str, seed: int = 0) -> Path:
    """A tiny VLM saved with its processor, as llava-hf publishes one."""
    tiny_model(family, seed).save_pretrained(path)
    tiny_processor(family).save_pretrained(path)
    return path


def stub_manifest(**fields):
    """A valid manifest for a checkpoint written by a test itself (counts are placeholders)."""
    from compress_eval.manifest import Manifest

    counts = dict(blocks_before=4, params_before=1, params_after=1, weight_bytes_before=1, weight_bytes_after=1)
    return Manifest(base_model={"name": "test"}, method="none", **{**counts, **fields})


@pytest.fixture(autouse=True)
def no_prepared_data(monkeypatch):
    """Tests see the data directory they name, never the user's prepared cache (``data prepare``'s
    default, which ``make setup`` fills from shared/data): without one they get the Hub."""
    from compress_eval import paths

    monkeypatch.setattr(paths, "prepared_data_dir", lambda: Path("/nonexistent/compress-eval-prepared-data"))


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


def saved_model_dir(path: Path, model) -> Path:
    """``model`` saved with the tiny tokenizer, as a user's local model directory would be."""
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path):
    return saved_model_dir(tmp_path / "tiny-llama", tiny_model("llama"))


def one_line_error(result, fragment: str) -> None:
    """A CliRunner result that failed as our errors do: exit 2, one ``error: ...`` line naming ``fragment``."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]


def write_data_dir(root: Path) -> Path:
    """A data directory in shared/data's layout, made from TEXT (tests never need the real one)."""
    import json

    import pandas as pd

    (root / "wikitext2").mkdir(parents=True)
    rows = [r for r in TEXT.split("\n")]
    for split in ("test", "validation"):
        with open(root / "wikitext2" / f"wikitext-2-raw-v1.{split}.rows.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps({"text": r}) + "\n")
    (root / "c4").mkdir()
    docs = [f"Document {i}. " + TEXT[(i * 37) % 900:(i * 37) % 900 + 200] for i in range(1200)]
    pd.DataFrame({"text": docs}).to_parquet(
        root / "c4" / "c4_validation_2k.parquet")
    return root


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """:func:`write_data_dir`, named by $COMPRESS_EVAL_DATA_DIR."""
    root = write_data_dir(tmp_path / "data")
    monkeypatch.setenv("COMPRESS_EVAL_DATA_DIR", str(root))
    return root


def kill_fine_tune_after(monkeypatch, step: str):
    """Make a recovery fine-tune stop as a kill would (KeyboardInterrupt) once ``step`` ("5/6") is done,
    before its state could be saved; returns what undoes it."""
    import compress_eval.methods.recovery as recovery

    real = recovery.require_finite

    def killed(value, params, what, hints):
        if f"step {step}" in what:
            raise KeyboardInterrupt
        return real(value, params, what, hints)

    monkeypatch.setattr(recovery, "require_finite", killed)
    return lambda: monkeypatch.setattr(recovery, "require_finite", real)

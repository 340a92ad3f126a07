"""Vision-language models: their language model compressed, the checkpoint a plain llava-hf one (processor,
config, untouched vision tower), lm-eval's multimodal type and the offline MMMU task on tiny VLMs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compress_eval.cli.app import app
from conftest import VLM_FAMILIES, saved_model_dir, saved_vlm_dir, tiny_model

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def image(seed: int = 0, size=(24, 20)):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8))


def untouched(state: dict) -> dict:
    """The tensors outside the language model (vision tower, projector, image newline)."""
    return {k: v for k, v in state.items() if "language_model" not in k and not k.startswith("lm_head")}


def image_inputs(model, family: str, directory: Path) -> dict:
    """A chat prompt with one image, as the checkpoint's processor makes it; Qwen2-VL's processor needs
    torchvision, so its inputs are assembled from its image processor and the config's token ids."""
    if family != "qwen2_vl":
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(directory)
        content = [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return dict(processor(images=[image()], text=[text], return_tensors="pt"))
    from transformers import Qwen2VLImageProcessor

    pixels = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=256,
                                   max_pixels=1024)(images=[image()], return_tensors="pt")
    cfg = model.config
    n_image = int(pixels["image_grid_thw"].prod()) // cfg.vision_config.spatial_merge_size ** 2
    ids = [5, 7, cfg.vision_start_token_id] + [cfg.image_token_id] * n_image + [cfg.vision_end_token_id, 9, 11]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            **pixels}


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_compressed_vlm_is_a_plain_checkpoint(family, data_dir, tmp_path):
    """shortgpt (calibrated as text through the language model) prunes a block; the checkpoint loads
    with the Auto classes at the new depth, keeps the vision side bit for bit, and generates the same
    tokens from an image with and without the KV cache."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    src = tmp_path / "src"
    if family == "qwen2_vl":
        saved_model_dir(src, tiny_model(family))
    else:
        saved_vlm_dir(src, family)
    out = tmp_path / "out"
    result = invoke("compress", src, "--method", "shortgpt", "--num-blocks", 1, "--calib-samples", 2,
                    "--seqlen", 16, "--out", out)
    assert result.exit_code == 0, result.output
    config = AutoConfig.from_pretrained(out)
    text = config.get_text_config()
    assert text.num_hidden_layers == 3
    for name, value in text.to_dict().items():  # every per-layer list follows the depth
        assert not isinstance(value, list) or len(value) != 4, name
    if getattr(text, "layer_types", None) is not None:
        assert len(text.layer_types) == 3
    if family != "qwen2_vl":
        assert type(AutoProcessor.from_pretrained(out)).__name__ == type(AutoProcessor.from_pretrained(src)).__name__
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "AutoModelForImageTextToText.from_pretrained" in card
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert len(model.model.language_model.layers) == 3
    before = untouched(AutoModelForImageTextToText.from_pretrained(src).state_dict())
    after = untouched(model.state_dict())
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    inputs = image_inputs(model, family, out)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


FUSE_FAST = ["--set", "epochs=1", "--set", "batch_size=2", "--set", "group_size=3", "--set", "coef_rank=64",
             "--set", "lora_rank=4"]


@pytest.mark.parametrize("method", [["sleb", "--num-blocks", 1], ["drop-window", "--num-blocks", 1],
                                    ["fuse", "--num-blocks", 1, *FUSE_FAST],
                                    ["drop", "--blocks", 1, "--recover", "lora", "--recover-steps", 2]],
                         ids=["sleb", "drop-window", "fuse", "lora-recovery"])
def test_every_method_compresses_the_language_model_only(method, data_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    src = saved_vlm_dir(tmp_path / "src", "llava_next")
    result = invoke("compress", src, "--method", *method, "--calib-samples", 4, "--seqlen", 16,
                    "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert model.config.text_config.num_hidden_layers == len(model.model.language_model.layers) == 3
    before = untouched(AutoModelForImageTextToText.from_pretrained(src).state_dict())
    after = untouched(model.state_dict())
    assert before and before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lora_adapters_stay_in_the_language_model():
    from compress_eval.config import RecoveryOptions
    from compress_eval.methods.recovery import _prepare
    from compress_eval.models.adapters import vision_modules

    model = tiny_model("llava")
    trainable = _prepare(model, RecoveryOptions(recover="lora"))
    names = [n for n, p in model.named_parameters() if any(p is t for t in trainable)]
    assert names and all(".language_model." in n for n in names)
    assert not any("lora_" in n for n, _ in model.named_parameters() if n.startswith(tuple(vision_modules(model))))


def test_a_vlm_without_a_processor_is_saved_text_only(data_dir, tmp_path, caplog):
    src = saved_model_dir(tmp_path / "src", tiny_model("llava"))
    result = invoke("compress", src, "--method", "drop", "--blocks", 1, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out" / "preprocessor_config.json").exists()
    assert "no loadable processor" in caplog.text


# --- names ---------------------------------------------------------------------------------------
def test_mmmu_names(tmp_path, monkeypatch):
    from compress_eval.errors import UserError
    from compress_eval.tasknames import display_name, lm_eval_task_name, parse_tasks, split_image_tasks

    monkeypatch.delenv("COMPRESS_EVAL_DATA_DIR", raising=False)
    assert parse_tasks("mmmu,mmmu_val,piqa,ce_mmmu") == ["mmmu_val", "piqa", "ce_mmmu"]
    assert split_image_tasks(["piqa", "mmmu_val", "ce_mmmu"]) == (["piqa"], ["mmmu_val", "ce_mmmu"])
    assert lm_eval_task_name("mmmu_val", None) == "mmmu_val"
    assert lm_eval_task_name("mmmu_val", tmp_path) == "ce_mmmu" == lm_eval_task_name("ce_mmmu", tmp_path)
    assert lm_eval_task_name("piqa", tmp_path) == "ce_piqa"
    assert display_name("ce_mmmu") == "mmmu_val" and display_name("ce_piqa") == "piqa"
    with pytest.raises(UserError, match="data directory"):
        lm_eval_task_name("ce_mmmu", None)


# --- easy-vqa in MMMU's schema ---------------------------------------------------------------------
def test_easy_vqa_questions_are_mmmu_multiple_choice():
    pytest.importorskip("easy_vqa")
    import ast

    import easy_vqa
    from lm_eval.tasks.mmmu.utils import doc_to_image, doc_to_text

    from compress_eval.data.easy_vqa import answer_groups, mmmu_rows

    rows = mmmu_rows("test", seed=3, limit=60)
    assert rows == mmmu_rows("test", seed=3, limit=60) and rows != mmmu_rows("test", seed=4, limit=60)
    _, answers, _ = easy_vqa.get_test_questions()
    groups = answer_groups()
    for row in rows:
        options = ast.literal_eval(row["options"])
        truth = answers[int(row["id"].rsplit("_", 1)[1]) - 1]
        assert options[ord(row["answer"]) - ord("A")] == truth
        assert set(options) <= set(groups[truth]) and len(set(options)) == len(options) == min(4, len(groups[truth]))
        doc = {**row, "image_1": "IMAGE"}
        assert doc_to_image(doc) == ["IMAGE"] and doc_to_text(doc).startswith("<image> ")
    assert {r["subfield"] for r in rows} == {"yes/no", "shape", "colour"}


@pytest.fixture
def vlm_data(tmp_path, monkeypatch):
    """A data directory with the text corpora, shared/data's PIQA when it is beside the checkout, and 8
    easy-vqa questions that `compress-eval data easy-vqa` wrote in MMMU's layout."""
    pytest.importorskip("easy_vqa")
    from conftest import SHARED_DATA, write_data_dir

    root = write_data_dir(tmp_path / "data")
    if (SHARED_DATA / "piqa").is_dir():
        (root / "piqa").symlink_to(SHARED_DATA / "piqa")
    done = subprocess.run([sys.executable, "-m", "compress_eval", "data", "easy-vqa", "--out", str(root / "mmmu"),
                           "--limit", "8"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "wrote 8 questions" in done.stdout and (root / "mmmu" / "EasyVQA" / "SOURCE-validation.md").is_file()
    monkeypatch.setenv("COMPRESS_EVAL_DATA_DIR", str(root))
    monkeypatch.setenv("COMPRESS_EVAL_CACHE", str(tmp_path / "cache"))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """lm-eval sends one small request at a time: a second OpenMP thread only waits (see test_lm_eval)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_eval_ce_mmmu_offline(vlm_data, tmp_path):
    vlm = saved_vlm_dir(tmp_path / "vlm", "llava")
    result = invoke("eval", vlm, "--tasks", "ce_mmmu", "--limit", 4)
    assert result.exit_code == 0, result.output
    assert "mmmu_val" in result.output and "acc" in result.output


def test_run_then_eval_mmmu_with_text_tasks(vlm_data, tmp_path):
    """One run: perplexity and a text benchmark through the language model, MMMU through the whole VLM;
    lm-eval's results of both kinds merged in the checkpoint, with the generation settings given."""
    text = ["piqa"] if (vlm_data / "piqa").exists() else []
    out = tmp_path / "out"
    result = invoke("run", saved_vlm_dir(tmp_path / "vlm", "llava_next"), "--method", "drop", "--blocks", 1,
                    "--out", out, "--then-eval", ",".join(["wiki", *text, "mmmu"]), "--limit", 1,
                    "--eval-seqlen", 16, "--max-windows", 2, "--gen-kwargs", "max_gen_toks=3")
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "lm_eval_results.json").read_text())
    assert stored["config"]["gen_kwargs"] == {"max_gen_toks": 3}
    assert set(stored["results"]) == {"ce_mmmu", *(f"ce_{t}" for t in text)}
    assert stored["config"]["model"] == "compressed-multimodal"
    assert "wikitext2_ppl" in json.loads((out / "results_ppl.json").read_text())


def test_image_tasks_run_in_the_chat_format_with_one_image(vlm_data, tmp_path):
    from compress_eval.eval_config import EvalConfig
    from compress_eval.evaluate import build_lm, evaluate_lm_eval

    vlm = str(saved_vlm_dir(tmp_path / "vlm", "llava"))
    cfg = EvalConfig(tasks=["mmmu_val"], limit=1)
    lm = build_lm(vlm, cfg, offload="none", images=True)
    evaluate_lm_eval(lm, vlm, cfg, ["mmmu_val"])
    assert lm.chat_applied and lm.max_images == 1


def test_multimodal_type_sets_the_processor_from_a_tokenizer_arg(tmp_path):
    """lm-eval's own hf-multimodal returns a given tokenizer= without setting its processor."""
    from transformers import ProcessorMixin

    from compress_eval.lm_eval_plugin import CompressedMultimodalLM

    vlm = str(saved_vlm_dir(tmp_path / "vlm", "llava"))
    lm = CompressedMultimodalLM(pretrained=vlm, tokenizer=vlm, device="cpu")
    assert isinstance(lm.processor, ProcessorMixin) and lm.tokenizer is lm.processor.tokenizer


def test_image_tasks_refuse_a_text_model(vlm_data, tiny_model_dir):
    from compress_eval.errors import UserError
    from compress_eval.eval_config import EvalConfig
    from compress_eval.evaluate import evaluate_tasks

    with pytest.raises(UserError, match="is a text model"):
        evaluate_tasks(str(tiny_model_dir), EvalConfig(tasks=["mmmu_val"], device="cpu"))
    with pytest.raises(UserError, match="--batch-size auto"):
        evaluate_tasks(str(tiny_model_dir), EvalConfig(tasks=["mmmu_val"], batch_size="auto", device="cpu"))


def test_merged_int8_vlm_loads_in_the_multimodal_type(data_dir, tmp_path):
    """FF merging (a tie map) then LLM.int8(): the language model's linears are quantized, the vision side
    stays float and equal to the source's, and compressed-multimodal rebuilds the ties."""
    pytest.importorskip("bitsandbytes")
    from compress_eval.lm_eval_plugin import CompressedMultimodalLM
    from compress_eval.models.adapters import get_adapter, vision_modules

    src = saved_vlm_dir(tmp_path / "src", "llava")
    out = tmp_path / "out"
    result = invoke("compress", src, "--method", "merge", "--window", "1-2", "--calib-samples", 2, "--seqlen", 16,
                    "--quantize", "int8", "--out", out)
    assert result.exit_code == 0, result.output
    lm = CompressedMultimodalLM(pretrained=str(out), device="cpu")
    adapter = get_adapter(lm.model)
    assert adapter.mlp(adapter.blocks[1]) is adapter.mlp(adapter.blocks[2])
    assert type(adapter.linear(adapter.blocks[0], "q")).__name__ == "Linear8bitLt"
    source = tiny_model("llava").state_dict()
    for path in vision_modules(lm.model):
        for name, module in lm.model.get_submodule(path).named_modules():
            assert type(module).__name__ != "Linear8bitLt", f"{path}.{name}"
        for name, tensor in lm.model.get_submodule(path).state_dict().items():
            assert torch.equal(tensor, source[f"{path}.{name}"]), f"{path}.{name}"


def test_image_text_calibration_gives_the_language_model_what_the_whole_vlm_gives(tmp_path):
    """A window of one question: the model run on its ids alone, with the image features written at its
    image tokens, gives the logits of the whole VLM run on the ids and the image."""
    import random

    from lm_eval.tasks.mmmu.utils import doc_to_text
    from transformers import AutoProcessor

    from compress_eval.data.easy_vqa import mmmu_rows
    from compress_eval.data.image_text import (chat_prompt, image_text_windows, images_in_embeddings,
                                               question_image, sequence_inputs, window_key)
    from compress_eval.models.adapters import get_adapter
    from compress_eval.models.loading import load_model

    directory = saved_vlm_dir(tmp_path / "vlm", "llava")
    model, _, _ = load_model(str(directory), "cpu")
    processor = AutoProcessor.from_pretrained(directory)
    rows = mmmu_rows("train", 0)
    random.Random(0).shuffle(rows)
    ids, _ = sequence_inputs(get_adapter(model), processor, rows[0])
    calib = image_text_windows(model, processor, "easy-vqa", 1, ids.numel(), seed=0)
    assert torch.equal(calib.ids[0], ids)
    mask = ids == calib.image_token
    assert mask.sum() > 0 and next(iter(calib.features.values())).shape[0] == mask.sum()
    # The whole VLM on the question with its image
    enc = processor(images=[question_image(rows[0])], text=[chat_prompt(processor, doc_to_text(rows[0]))],
                    return_tensors="pt")
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        whole = model(**enc).logits[0]
        plain = model(input_ids=calib.ids).logits[0, :n]
        with images_in_embeddings(calib, model):
            seen = model(input_ids=calib.ids).logits[0, :n]
    torch.testing.assert_close(seen, whole, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, whole, atol=1e-3)  # without the hook the image is not seen
    # Two windows packed from several questions: every image token of each has its feature.
    calib = image_text_windows(model, processor, "easy-vqa", 2, 3 * ids.numel(), seed=1)
    for window in calib.ids:
        assert calib.features[window_key(window)].shape[0] == (window == calib.image_token).sum() > 0


def test_compress_with_image_text_calibration(data_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("compress", saved_vlm_dir(tmp_path / "vlm", "llava"), "--method", "sleb", "--num-blocks", 1,
                    "--calib-data", "easy-vqa", "--calib-samples", 2, "--seqlen", 48, "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "compress_eval.json").read_text())
    assert manifest["config"]["calib_data"] == "easy-vqa" and len(manifest["removed_blocks"]) == 1


def test_image_text_recovery_trains_on_its_own_train_split_questions(data_dir, tmp_path, monkeypatch):
    """--recover-data train with image-text calibration: steps x batch windows of easy-vqa's train questions,
    not the calibration's, each seen with its images (the hook refuses image tokens it has no features for)."""
    import compress_eval.pipeline as pipeline

    pytest.importorskip("easy_vqa")
    made = []
    real = pipeline.image_text_windows
    monkeypatch.setattr(pipeline, "image_text_windows", lambda *a: made.append(real(*a)) or made[-1])
    out = tmp_path / "out"
    result = invoke("compress", saved_vlm_dir(tmp_path / "vlm", "llava"), "--method", "shortgpt", "--num-blocks", 1,
                    "--calib-data", "easy-vqa", "--calib-samples", 2, "--seqlen", 48, "--recover", "lora",
                    "--recover-data", "train", "--recover-steps", 3, "--out", out)
    assert result.exit_code == 0, result.output
    recovery = json.loads((out / "compress_eval.json").read_text())["recovery"]
    assert (recovery["data"], recovery["sequences"]) == ("train", 3)
    calibration, training = made
    assert training.ids.shape == (3, 48) and not any(torch.equal(t, c) for t in training.ids for c in calibration.ids)
    assert all((w == training.image_token).any() for w in training.ids)


# --- offloaded ------------------------------------------------------------------------------------
def tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for path in sorted(directory.glob("*.safetensors")) for k, v in load_file(path).items()}


@pytest.mark.parametrize("method", [["shortgpt", "--num-blocks", 1],
                                    ["shortgpt", "--num-blocks", 1, "--calib-data", "easy-vqa", "--seqlen", 48],
                                    ["fuse", "--num-blocks", 1, *FUSE_FAST],
                                    ["merge", "--set", "num_merge=1", "--set", "feature_tokens=16"]],
                         ids=["shortgpt", "shortgpt-image-text", "fuse", "merge"])
def test_offloaded_vlm_gives_the_in_memory_checkpoint_bitwise(method, data_dir, tmp_path):
    """The language model runs unit by unit from the llava-hf checkpoint's legacy tensor names, and the
    offloaded save writes those names again: the same tensors, bit for bit, and the processor."""
    src = saved_vlm_dir(tmp_path / "src", "llava")
    outs = {mode: tmp_path / mode for mode in ("none", "disk")}
    for mode, out in outs.items():
        result = invoke("compress", src, "--method", *method, "--calib-samples", 2, "--seqlen", 16,
                        "--offload", mode, "--out", out)
        assert result.exit_code == 0, result.output
    assert json.loads((outs["disk"] / "compress_eval.json").read_text())["offload"] == "disk"
    a, b = tensors(outs["none"]), tensors(outs["disk"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (outs["disk"] / "processor_config.json").is_file()


def test_offloaded_vlm_evaluates_images_and_text(vlm_data, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", saved_vlm_dir(tmp_path / "vlm", "llava"), "--method", "drop", "--blocks", 1,
                    "--offload", "cpu", "--out", out, "--then-eval", "wiki,mmmu", "--limit", 2,
                    "--eval-seqlen", 16, "--max-windows", 2, "--gen-kwargs", "max_gen_toks=3")
    assert result.exit_code == 0, result.output
    assert "ce_mmmu" in json.loads((out / "lm_eval_results.json").read_text())["results"]
    result = invoke("eval", out, "--tasks", "ce_mmmu", "--limit", 2, "--offload", "disk")
    assert result.exit_code == 0, result.output


# --- easy-vqa, an optional extra --------------------------------------------------------------------
def test_without_easy_vqa_each_use_names_the_extra(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # import easy_vqa raises ImportError
    from compress_eval.data.easy_vqa import mmmu_rows
    from compress_eval.errors import UserError

    with pytest.raises(UserError, match=r"compress-eval\[multimodal\]"):
        mmmu_rows("train")
    uses = [("data", "easy-vqa", "--out", tmp_path / "mmmu", "--limit", 2),
            ("compress", saved_vlm_dir(tmp_path / "vlm", "llava"), "--method", "shortgpt", "--num-blocks", 1,
             "--calib-data", "easy-vqa", "--calib-samples", 1, "--seqlen", 48, "--out", tmp_path / "out")]
    for args in uses:
        result = invoke(*args)
        assert result.exit_code != 0
        assert "easy-vqa is not installed: pip install 'compress-eval[multimodal]'" in result.output, result.output
        assert "Traceback" not in result.output


def test_image_labels_are_what_the_questions_say():
    pytest.importorskip("easy_vqa")
    import easy_vqa

    from compress_eval.data.easy_vqa import image_labels

    paths, labels = image_labels("test")
    assert len(paths) == len(labels["colour"]) == len(labels["shape"]) == 1000
    assert sum(c is not None for c in labels["colour"]) > 900 and sum(s is not None for s in labels["shape"]) > 900
    for text, answer, image in zip(*easy_vqa.get_test_questions()):
        if text.startswith("what color"):
            assert labels["colour"][image] == answer
        if text.startswith("what shape"):
            assert labels["shape"][image] == answer


def test_llava_next_is_refused_offloaded(data_dir, tmp_path):
    """Its image_newline is a parameter of the module that holds the blocks: no unit moves it, so an
    offloaded run would lose it."""
    result = invoke("compress", saved_vlm_dir(tmp_path / "src", "llava_next"), "--method", "drop", "--blocks", 1,
                    "--offload", "disk", "--out", tmp_path / "out")
    assert result.exit_code != 0 and "'model.image_newline' lies outside" in result.output, result.output

"""Shared-prefix scoring in the ``compressed`` model type: HFLM's numbers (log-likelihood within 1e-4
nats in fp32, the same is_greedy) on a few documents of each offline task, for a tiny model of every
family and for compressed checkpoints; sharing happens; the off switch and the fallbacks are HFLM's path."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from lm_eval.models.huggingface import HFLM

from compress_eval.config import make_config
from compress_eval.lm_eval_plugin import CompressedLM, tasks_dir
from compress_eval.pipeline import compress, save
from compress_eval.scoring import shared_prefix as sp
import conftest
from conftest import FAMILIES, SHARED_DATA, VLM_FAMILIES, saved_model_dir, tiny_model

OFFLINE = ["ce_piqa", "ce_arc_easy", "ce_arc_challenge", "ce_hellaswag", "ce_winogrande"]
DOCS = 4  # per task: WinoGrande's first four are two pairs of twins
TOLERANCE = 1e-4  # nats, fp32


def bound(reference: float) -> float:
    """TOLERANCE, or 4 float32 steps of the sum where that is more: a random tiny model's continuation of
    150 characters scores about -600 nats, where HFLM's own fp32 sum moves in steps of 6e-5."""
    return max(TOLERANCE, 4 * float(np.spacing(np.float32(abs(reference)))))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def instances():
    """lm-eval's requests for the first DOCS documents of each offline task, in a seeded shuffle, so that
    the members of a group are apart and request order is not the order of the groups."""
    if not (SHARED_DATA / "piqa").is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    from lm_eval.tasks import TaskManager, get_task_dict

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESS_EVAL_DATA_DIR", str(SHARED_DATA))
        tasks = get_task_dict(OFFLINE, TaskManager(include_path=tasks_dir(), include_defaults=False))
        found = []
        for task in tasks.values():
            task.build_all_requests(limit=DOCS, rank=0, world_size=1)
            found += task.instances
    random.Random(0).shuffle(found)
    return found


def assert_hflm_scores(lm: CompressedLM, instances, reference: CompressedLM | None = None) -> None:
    """Our scores against HFLM's path (``reference``, by default the same model switched off), request
    by request."""
    lm.shared_prefix = True
    ours = lm.loglikelihood(instances, disable_tqdm=True)
    reference = reference or lm
    reference.shared_prefix = False
    run_before = reference.contexts_run
    theirs = reference.loglikelihood(instances, disable_tqdm=True)
    assert reference.contexts_run == run_before  # switched off: nothing shared
    assert len(ours) == len(theirs) == len(instances)
    for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, theirs, strict=True):
        assert abs(ll - ref_ll) <= bound(ref_ll), (ll, ref_ll)
        assert greedy == ref_greedy


def loaded(path, **args) -> CompressedLM:
    return CompressedLM(pretrained=str(path), device="cpu", **{"batch_size": 3, "dtype": "float32", **args})


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in VLM_FAMILIES])
def test_every_family_scores_as_hflm_and_shares(family, instances, tmp_path):
    lm = loaded(saved_model_dir(tmp_path / family, tiny_model(family)))
    assert_hflm_scores(lm, instances)
    assert 0 < lm.contexts_run < len(instances)


def test_vision_language_models_take_hflms_path(instances, tmp_path):
    lm = loaded(saved_model_dir(tmp_path / "llava", tiny_model("llava")))
    assert not lm._shares_prefixes()
    assert_hflm_scores(lm, instances)
    assert lm.contexts_run == 0


def checkpoint(tmp_path, data_dir, name: str, model, **config):
    source = saved_model_dir(tmp_path / f"{name}-source", model)
    return save(compress(make_config(model=str(source), calib_samples=2, seqlen=16, **config), data_dir),
                tmp_path / name)


CHECKPOINTS = {  # name: (model, compression)
    "depth-pruned": (lambda: tiny_model("llama"), dict(method="drop", blocks=[1, 2])),
    "ff-tied": (lambda: tiny_model("llama"), dict(method="merge", options={"num_merge": 2})),
    "sublayer": (lambda: conftest.deep_tiny("llama", layers=6), dict(method="sublayer", options={"num_sublayers": 3})),
    "sublayer-gemma3": (lambda: conftest.deep_tiny("gemma3_text", layers=6),
                        dict(method="sublayer", options={"num_sublayers": 3})),
    "int8": (lambda: tiny_model("llama", hidden=64), dict(method="drop", blocks=[1], quantize="int8")),
    "nf4": (lambda: tiny_model("llama", hidden=64), dict(method="none", quantize="nf4")),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_compressed_checkpoints_score_as_hflm(name, instances, tmp_path, data_dir):
    """int8 against HFLM one request at a time: LLM.int8 picks its outlier columns over a whole batch, so
    a batched HFLM's own scores move with the other requests in the batch (by 2.6e-4 nats here)."""
    if name in ("int8", "nf4"):
        pytest.importorskip("bitsandbytes")
    model, config = CHECKPOINTS[name]
    path = checkpoint(tmp_path, data_dir, name, model(), **config)
    lm = loaded(path)
    assert_hflm_scores(lm, instances, loaded(path, batch_size=1) if name == "int8" else None)
    assert 0 < lm.contexts_run < len(instances)


def test_results_fill_hflms_request_cache(instances, tmp_path):
    lm = loaded(saved_model_dir(tmp_path / "llama", tiny_model("llama")))
    cached = {}
    lm.cache_hook.add_partial = lambda kind, request, answer: cached.setdefault(request, answer)
    scores = lm.loglikelihood(instances, disable_tqdm=True)
    assert {inst.args: score for inst, score in zip(instances, scores)} == cached


def test_model_arg_turns_it_off(instances, tmp_path):
    path = saved_model_dir(tmp_path / "llama", tiny_model("llama"))
    lm = CompressedLM.create_from_arg_string(f"pretrained={path},shared_prefix=False,dtype=float32",
                                             {"device": "cpu", "batch_size": 3})
    assert lm.shared_prefix is False and not lm._shares_prefixes()
    ours = lm.loglikelihood(instances, disable_tqdm=True)
    assert lm.contexts_run == 0
    assert ours == HFLM._loglikelihood_tokens(lm, [(i.args, *lm._encode_pair(*i.args)) for i in instances],
                                              disable_tqdm=True)


def test_offloaded_models_take_hflms_path(instances, tmp_path):
    lm = loaded(saved_model_dir(tmp_path / "llama", tiny_model("llama")), offload="cpu")
    assert not lm._shares_prefixes()


def test_grouping_shares_contexts_within_and_across_documents():
    requests = [(None, [1, 2], [3]), (None, [1, 2], [4, 5]), (None, [7], [3]), (None, [1, 2], [6]),
                (None, [9, 9, 9], [1, 2]), (None, [7], [8]), (None, [5], [1])]
    groups, alone = sp.group_by_context(requests, max_length=8)
    assert groups == [[0, 1, 3], [2, 5]] and alone == [4, 6]
    groups, alone = sp.group_by_context(requests, max_length=3)  # [9, 9, 9] + [1, 2] would be truncated
    assert alone == [4, 6]
    groups, alone = sp.group_by_context(requests, max_length=2)
    assert groups == [[0, 3], [2, 5]] and alone == [1, 4, 6]
    # HFLM runs [1, 2] once for [3] and [6] (its own reuse: same context + continuation[:-1]), [1, 2, 4],
    # [7] once, [9, 9, 9, 1], [5]; we run [1, 2] once and [4] after it, [7] once, the rest as HFLM does.
    assert sp.token_counts(requests, max_length=8) == (2 + 3 + 1 + 4 + 1, (2 + 1) + 1 + 4 + 1)


def test_context_batches_pad_unless_told_not_to():
    requests = [(None, [1] * n, [2]) for n in (9, 2, 10, 9)]
    groups = [[0], [1], [2], [3]]
    # one forward of 4 x 10 tokens costs less than 3 x 10 + 2 tokens in two
    assert sp.context_batches(requests, groups, batch_size=4) == [[[2], [0], [3], [1]]]
    assert sp.context_batches(requests, groups, batch_size=4, pad=False) == [[[2]], [[0], [3]], [[1]]]
    assert all(len(batch) <= 2 for batch in sp.context_batches(requests, groups, batch_size=2))


@pytest.mark.parametrize("family, pads", [("llama", True), ("gemma3_text", False)])
def test_sliding_window_models_batch_contexts_of_one_length(family, pads, tmp_path):
    assert loaded(saved_model_dir(tmp_path / family, tiny_model(family)))._pads_contexts() is pads


def test_rows_split_where_padding_would_cost_more_than_a_forward():
    assert sp.split_rows([30, 29, 2, 2, 1, 0, 0], batch_size=8, forward_tokens=16) == [(0, 2), (2, 5), (5, 7)]
    spans = sp.split_rows([5, 5, 5, 5, 5], batch_size=2, forward_tokens=16)
    assert len(spans) == 3 and all(end - start <= 2 for start, end in spans)
    assert sp.split_rows([3, 3, 3], batch_size=8, forward_tokens=16) == [(0, 3)]
    assert sp.split_rows([], batch_size=8) == []

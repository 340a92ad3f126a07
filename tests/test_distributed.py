"""Data parallelism: two processes on the gloo backend (torchrun) give the one-process result.

Each case runs the same command once plainly and once under ``torchrun --nproc_per_node 2``; the
manifest's world size and windows per rank would be missing if only one process had run.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import saved_model_dir, tiny_config
from tests.fault_point import in_collective

pytestmark = pytest.mark.slow
CALIB = ["--calib-samples", "4", "--seqlen", "16"]


@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    return saved_model_dir(tmp_path_factory.mktemp("dp") / "six", AutoModelForCausalLM.from_config(config).eval())


def launch(args: list[str], data_dir, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMPRESS_EVAL_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    result = subprocess.run([*prefix, "-m", "compress_eval", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def both(args: list[str], out_name: str, tmp_path, data_dir) -> tuple[dict, dict, dict, dict]:
    """(manifest, tensors) of one process and of two, for ``compress ... --out``."""
    runs = []
    for n in (1, 2):
        out = tmp_path / f"{out_name}-{n}"
        launch([*args, "--out", out], data_dir, n)
        runs += [json.loads((out / "compress_eval.json").read_text()), load_file(out / "model.safetensors")]
    return tuple(runs)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_scores_are_summed_over_processes(six_blocks, data_dir, tmp_path):
    """SLEB's NLL and ShortGPT's cosines (the latter block by block from disk) summed over two ranks
    choose the one-process blocks."""
    for method, placement in (("sleb", "none"), ("shortgpt", "disk")):
        one, w1, two, w2 = both(["compress", six_blocks, "--method", method, "--num-blocks", "2", *CALIB,
                                 "--offload", placement], method, tmp_path, data_dir)
        assert one["offload"] == two["offload"] == placement
        assert {k: two["distributed"][k] for k in ("world_size", "windows_per_rank", "backend")} == \
            {"world_size": 2, "windows_per_rank": [2, 2], "backend": "gloo"}
        assert two["distributed"]["collectives"]["calls"] > 0
        assert "distributed" not in one or one["distributed"] is None
        assert one["removed_blocks"] == two["removed_blocks"]
        assert max_difference(w1, w2) == 0.0  # removal alone: the same tensors
        assert one["details"]["removal_order"] == two["details"]["removal_order"]
        if method == "shortgpt":
            assert one["details"]["block_influence"] == pytest.approx(two["details"]["block_influence"], rel=1e-5)
        else:
            assert two["details"]["calibration_tokens"] == one["details"]["calibration_tokens"] == 4 * 15
            assert one["details"]["iterations"][0]["ppl"] == pytest.approx(two["details"]["iterations"][0]["ppl"],
                                                                          rel=1e-5)


def test_fusion_fine_tune_averages_gradients(six_blocks, data_dir, tmp_path):
    """One fusion: the same block removed; the fine-tuned weights agree to float32 reduction order."""
    args = ["compress", six_blocks, "--method", "fuse", "--num-blocks", "1", *CALIB, "--group-size", "3",
            "--epochs", "2", "--batch-size", "2", "--mi-samples", "4"]
    one, w1, two, w2 = both(args, "fuse", tmp_path, data_dir)
    assert one["removed_blocks"] == two["removed_blocks"]
    assert two["distributed"]["world_size"] == 2
    assert max_difference(w1, w2) < 1e-4
    l1, l2 = one["details"]["iterations"][0]["epoch_losses"], two["details"]["iterations"][0]["epoch_losses"]
    assert l1 == pytest.approx(l2, rel=1e-4)


def test_recovery_stage_averages_gradients(six_blocks, data_dir, tmp_path):
    """Without dropout (each process draws its own masks) LoRA recovery matches one process."""
    args = ["compress", six_blocks, "--method", "drop", "--blocks", "1", *CALIB, "--recover", "lora",
            "--recover-steps", "3", "--recover-batch-size", "2", "--lora-dropout", "0"]
    one, w1, two, w2 = both(args, "lora", tmp_path, data_dir)
    assert max_difference(w1, w2) < 1e-4
    assert one["recovery"]["losses"] == pytest.approx(two["recovery"]["losses"], rel=1e-3)


def test_perplexity_windows_are_split(six_blocks, data_dir):
    args = ["ppl", six_blocks, "--dataset", "wikitext2", "--seqlen", "16", "--max-windows", "5"]
    one, two = (float(launch(args, data_dir, n).stdout.strip().splitlines()[-1]) for n in (1, 2))
    assert one == pytest.approx(two, rel=1e-6)


def test_a_killed_rank_stops_every_rank_and_writes_nothing(six_blocks, data_dir, tmp_path):
    """SIGKILL rank 1 inside the method while rank 0 waits in a collective: rank 0 stops with one line,
    torchrun ends the run, no --out."""
    import signal
    import time
    from pathlib import Path

    ready, out = tmp_path / "ready", tmp_path / "out"
    env = {**os.environ, "COMPRESS_EVAL_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "FAULT_RANK": "1"}
    fault = Path(__file__).parent / "fault_point.py"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(fault), "method", str(ready), "compress", str(six_blocks), "--method", "sleb",
                             "--num-blocks", "1", *CALIB, "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ready.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert ready.exists(), proc.communicate()[0]
    ranks = {}
    for pid in os.listdir("/proc"):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(fault).encode() in cmdline and str(ready).encode() in cmdline:
            rank = next((e.split(b"=")[1] for e in environ if e.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[int(rank)] = int(pid)
    assert set(ranks) == {0, 1}, ranks
    waiting = in_collective(ready, "0")  # rank 0 inside an all-reduce while rank 1 is paused: it waits for rank 1
    while not waiting.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert waiting.exists(), proc.communicate()[0]
    os.kill(ranks[1], signal.SIGKILL)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert not out.exists()
    said = [line for line in output.splitlines() if line.startswith("error: ")]
    # one line: the failed collective's, or the SIGTERM's when torchrun's signal came first
    assert len(said) == 1 and "another process of this run stopped" in said[0], output
    assert "[rank0]: Traceback" not in output  # torchrun's own report follows, ours is the one line
    for pid in ranks.values():
        assert gone_or_zombie(pid), output


def gone_or_zombie(pid: int) -> bool:
    """Whether a process has ended (its /proc entry may vanish while it is read: reaped meanwhile)."""
    from pathlib import Path

    try:
        return b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_lm_eval_requests_are_split_over_processes(six_blocks, tmp_path):
    """``torchrun -m compress_eval lm-eval --model compressed``: rank 1 builds its share, same scores."""
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "piqa").is_dir():
        pytest.skip("needs ../shared/data/piqa")
    scores = []
    for n in (1, 2):
        out = tmp_path / f"lm-eval-{n}"
        result = launch(["lm-eval", "--model", "compressed", "--model_args", f"pretrained={six_blocks}",
                         "--tasks", "ce_piqa", "--limit", "8", "--device", "cpu", "--output_path", out],
                        SHARED_DATA, n)
        assert ("on rank 1" in result.stderr + result.stdout) == (n == 2)
        saved = next(out.rglob("results_*.json"))
        scores.append(json.loads(saved.read_text())["results"]["ce_piqa"])
    assert scores[0]["acc,none"] == scores[1]["acc,none"] and scores[0]["acc_norm,none"] == scores[1]["acc_norm,none"]

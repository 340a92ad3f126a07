"""Our lm-eval model types as lm-eval's plugin loader finds them (its main branch, after 0.4.13;
docs/plugins.md there): the ``lm_eval.models`` entry points of installed distributions, read through
``importlib.metadata``, recorded as lazy placeholders and loaded (``ep.load()``) when a run names one.
The module's own ``@register_model`` then fires and must agree with the placeholder."""

import json
import subprocess
import sys
from importlib.metadata import entry_points

from lm_eval.models.huggingface import HFLM

from compress_eval.lm_eval_plugin import MODEL_TYPE, MULTIMODAL_TYPE, CompressedLM, CompressedMultimodalLM

OURS = {MODEL_TYPE: CompressedLM, MULTIMODAL_TYPE: CompressedMultimodalLM}

# A fresh process, as a run starts: discovery reads the metadata only; the first lookup imports the module,
# whose decorator meets the placeholder (lm-eval upgrades it in place when both name the same class).
LOADER = """
import json, sys
from importlib.metadata import entry_points
from lm_eval.api.registry import model_registry
found = {ep.name: ep for ep in entry_points(group="lm_eval.models")}
for name in %r:
    model_registry.register(name, target=found[name].value)
lazy = "compress_eval.lm_eval_plugin" not in sys.modules
classes = {name: model_registry.get(name) for name in %r}
print(json.dumps({"lazy": lazy, **{n: f"{c.__module__}:{c.__qualname__}" for n, c in classes.items()}}))
"""


def test_entry_points_load_our_model_classes():
    found = {ep.name: ep for ep in entry_points(group="lm_eval.models")}
    for name, cls in OURS.items():
        assert found[name].load() is cls
        assert issubclass(cls, HFLM)
        # What lm-eval compares to reconcile the placeholder with the decorator's registration.
        assert found[name].value == f"{cls.__module__}:{cls.__qualname__}"


def test_a_fresh_run_resolves_the_entry_points_lazily():
    names = list(OURS)
    done = subprocess.run([sys.executable, "-c", LOADER % (names, names)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {"lazy": True, **{n: f"{c.__module__}:{c.__qualname__}" for n, c in OURS.items()}}

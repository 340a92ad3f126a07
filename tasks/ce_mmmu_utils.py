"""lm-eval's own MMMU prompt, image selection and answer parsing (``lm_eval/tasks/mmmu/utils.py``) for
``ce_mmmu.yaml``: imported, not copied, so the offline task scores exactly as ``mmmu_val`` does."""

from lm_eval.tasks.mmmu.utils import doc_to_image, doc_to_text, process_results

__all__ = ["doc_to_image", "doc_to_text", "process_results"]

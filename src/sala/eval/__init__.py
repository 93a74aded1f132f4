"""Long-context evaluation: RULER-style tasks, held-out perplexity and speed vs context length, with reports.

Entry points: ``sala eval`` (``cli.eval_command``) and ``runner.run_eval``.
"""

from .scoring import contains_answer, sample_score, string_match_all
from .tasks import TASKS, Sample, generate_samples

__all__ = ["TASKS", "Sample", "contains_answer", "generate_samples", "sample_score", "string_match_all"]

"""Meta-reflection prompts, the answer-leak guard and teacher contexts (text level)."""

from .contexts import (amr_sd_teacher_prompt, rlsd_teacher_prompt, sdpo_teacher_prompt,
                       select_peer)
from .prompts import ReflectionInputs, follow_up_reflection_prompt, reflection_prompt
from .leak_guard import REDACTION, redact_answer

__all__ = ["REDACTION", "ReflectionInputs", "amr_sd_teacher_prompt",
           "follow_up_reflection_prompt", "redact_answer", "reflection_prompt",
           "rlsd_teacher_prompt", "sdpo_teacher_prompt", "select_peer"]

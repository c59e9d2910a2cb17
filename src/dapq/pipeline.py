"""A transformers pipeline, "dapq-text-generation", shaped like kvpress's "kv-press-text-generation".

    import dapq.pipeline  # registers the task with transformers (explicitly: `import dapq` alone does not)
    from transformers import pipeline
    pipe = pipeline("dapq-text-generation", model=model, tokenizer=tok)
    pipe(context, question="Who signed it?", method=dapq.get_method("snapkv", budget=128))["answer"]
    pipe(context, questions=["Who?", "When?"], method="dapq", method_params={"budget": 128})["answers"]

A kvpress user changes `press=` to `method=` (a dapq Method, or a registered name with `method_params`). The call
takes `question` or `questions`, `answer_prefix`, `max_new_tokens`, `mode` and generation options (`do_sample`,
`temperature`, `top_k`, `top_p`, `seed`). Modes:
- "question_agnostic" (the default, as kvpress): the context is compressed once and every question is answered
  against it (`dapq.answer_many`);
- "query_aware": each question is compressed together with the context (`dapq.generate`), as in the DapQ paper.
The answers are exactly those of `answer_many` / `generate` with the same settings (the pipeline calls them).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .engine.decode import Sampling
from .engine.serve import MODES, answer_many, generate, resolve_method
from .errors import DapqError

TASK = "dapq-text-generation"


class DapqTextGenerationPipeline(Pipeline):
    """Answer one or several questions about a long context with the KV cache compressed by a dapq method."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(
        self,
        question: str | None = None,
        questions: list[str] | None = None,
        answer_prefix: str | None = None,
        method: Any = None,
        method_params: dict[str, Any] | None = None,
        mode: str = "question_agnostic",
        max_new_tokens: int = 50,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        chat_template: bool | None = None,
        **unknown: Any,
    ) -> tuple[dict, dict, dict]:
        if unknown:
            raise DapqError(f"dapq-text-generation got unknown options: {', '.join(sorted(unknown))}.")
        if question is not None and questions is not None:
            raise DapqError("Pass either question= or questions=, not both.")
        if questions is not None and (
            isinstance(questions, str) or not questions or not all(isinstance(q, str) for q in questions)
        ):
            raise DapqError("questions= takes a non-empty list of strings (one question: question=).")
        if mode not in MODES:
            raise DapqError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        sampling = None
        if do_sample:
            sampling = Sampling(
                temperature=1.0 if temperature is None else temperature,
                top_k=0 if top_k is None else top_k,
                top_p=1.0 if top_p is None else top_p,
                seed=seed,
            )
        elif any(v is not None for v in (temperature, top_k, top_p, seed)):
            raise DapqError("temperature, top_k, top_p and seed only apply when sampling: pass do_sample=True.")
        forward = {
            "questions": list(questions) if questions is not None else [question or ""],
            "method": resolve_method(method, **(method_params or {})),
            "mode": mode,
            "max_new_tokens": max_new_tokens,
            "answer_prefix": answer_prefix or "",
            "sampling": sampling,
            "chat_template": chat_template,
        }
        return {}, forward, {"single": questions is None}

    def preprocess(self, context: str) -> dict[str, Any]:
        if not isinstance(context, str):
            raise DapqError(f"The context must be a string; got {type(context).__name__}.")
        return {"context": context}

    def _forward(self, inputs: dict[str, Any], **options: Any) -> list[str]:
        questions = options.pop("questions")
        mode = options.pop("mode")
        if mode == "question_agnostic":
            outs = answer_many(self.model, self.tokenizer, inputs["context"], questions, **options)
        else:
            outs = [generate(self.model, self.tokenizer, inputs["context"], q, **options) for q in questions]
        return [str(o.text) for o in outs]

    def postprocess(self, answers: list[str], single: bool = True) -> dict[str, Any]:
        return {"answer": answers[0]} if single else {"answers": answers}


def register() -> None:
    """Register "dapq-text-generation" with transformers' pipeline registry (done once when this module is
    imported; calling it again is harmless)."""
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=DapqTextGenerationPipeline, pt_model=AutoModelForCausalLM
        )


register()

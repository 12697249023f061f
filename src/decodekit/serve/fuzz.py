"""The app that ``tests/test_serve_fuzz.py`` and ``benchmarks/serve_fuzz.py`` fuzz: the real
engine and app over a tiny random Llama (any tokenizer: its vocabulary sets the model's), so a
fuzzed request that is valid decodes in milliseconds. ``max_tokens_limit`` keeps valid requests
short (it is part of the schema, so valid ones stay under it)."""

from __future__ import annotations

__all__ = ["build_fuzz_app", "tiny_random_llama"]


def tiny_random_llama(tokenizer, seed: int = 3, context: int = 256):
    """A 2-layer, 32-wide random Llama with ``tokenizer``'s vocabulary, EOS and pad."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_fuzz_app(tokenizer, *, max_tokens_limit: int = 8, max_batch_size: int = 4, timeout: float = 60.0):
    """``(app, engine)``: a started engine over a tiny random Llama behind the real app."""
    from decodekit.model_info import context_length
    from decodekit.serve.app import create_app
    from decodekit.serve.engine import Engine
    from decodekit.serve.limits import Limits

    model = tiny_random_llama(tokenizer)
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=64)
    engine.start()
    limits = Limits(max_tokens_limit=max_tokens_limit, timeout=timeout)
    app = create_app(engine, tokenizer, "tiny-fuzz", context=context_length(model), limits=limits)
    return app, engine


OPERATIONS = [("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/v1/models", "GET"),
              ("/v1/decoding/options", "GET"), ("/health", "GET"), ("/metrics", "GET")]


def fuzz_checks() -> list:
    """The schemathesis checks: no 5xx, documented statuses, content types and bodies (errors
    in OpenAI's shape), invalid bodies refused."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance,
            response_schema_conformance, negative_data_rejection]


def fuzz_operation(schema, path: str, method: str, mode, examples: int, seed: int | None = None) -> int:
    """Up to ``examples`` generated requests (``mode``: schemathesis' ``GenerationMode``) for one
    operation, each validated by ``fuzz_checks``; a failure raises (hypothesis shrinks it
    first). Returns how many requests were sent."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as fix_seed

    sent, checks = [0], fuzz_checks()

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    def one(case):
        sent[0] += 1
        case.call_and_validate(checks=checks)

    (fix_seed(seed)(one) if seed is not None else one)()
    return sent[0]

"""decodekit: every major LLM decoding strategy on any Hugging Face causal LM."""

from decodekit.api import build_request, generate, generate_super, prepare_inputs
from decodekit.attention import use_gqa_attention
from decodekit.cache import ModelState, left_pad, prune_cache
from decodekit.constraints import (
    CONSTRAINT_OPTIONS,
    ConstraintSpec,
    GrammarConstraint,
    RowConstraints,
    constraint_stats,
    forced_tokens,
)
from decodekit.detok import IncrementalDetokenizer, TextCallbackStreamer
from decodekit.int8_kernel import int8_kernel, int8_kernel_problem
from decodekit.io import encode_prompts, load_prompts
from decodekit.kvstate import Backend, KVState, backend_of, register_backend
from decodekit.llamacpp import LlamaCppModel, LlamaCppState
from decodekit.model_info import context_length, default_eos_pad, vocab_size
from decodekit.models import (
    BACKENDS,
    BUNDLED_MODELS,
    DEFAULT_MODEL,
    DTYPES,
    check_model_spec,
    load_model,
)
from decodekit.ngram_storage import INgramStorage, NGramStorage, OneLevelNGramStorage
from decodekit.outputs import GenerationOutput, RequestStats, RowTracker
from decodekit.params import GenerateParams, from_generation_config
from decodekit.processors import (
    KNOBS,
    PROCESSOR_OPTIONS,
    BadWords,
    HistoryProcessor,
    Knob,
    LogitBias,
    LogitsPipeline,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    SuppressTokens,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    check_min_new_tokens,
    check_processor_options,
    make_pipeline,
    top_k_filtering,
    top_p_filtering,
)
from decodekit.quality import continuation_loglik, distinct_n, exact_match, normalize_answer
from decodekit.quant import QuantLinear, quant_kernel, quantize_model
from decodekit.ray import RayEngine, generate_dataset  # Ray itself is imported only when used
from decodekit.seed import (
    ExtendedInferenceSampler,
    GreedyProcessor,
    LogitsProcessor,
    MultinomialProcessor,
    NucleusProcessor,
    TopKNucleusProcessor,
    TopKProcessor,
    autoregressive_generate,
    beam_search_generate,
    iterative_generate,
    make_processor,
    ngram_assisted_speculative_generate,
    speculative_generate,
)
from decodekit.serve.engine import Engine, EngineRequest
from decodekit.strategies import STRATEGIES
from decodekit.strategies.beam import format_beam_trace
from decodekit.strategies.drafting import Draft, Drafter
from decodekit.strategies.eagle import EagleDrafter, EagleHead, load_head
from decodekit.strategies.eagle.train import TrainConfig, train_drafter
from decodekit.strategies.eis import format_eis_trace
from decodekit.strategies.ngram import AcceptanceGate, NgramDrafter, PromptLookupDrafter
from decodekit.strategies.refine import decode_jacobi, decode_refine, format_refine_trace
from decodekit.strategies.session import DecodeSession
from decodekit.strategies.verify import max_fn
from decodekit.validation import DecodeKitError

__version__ = "0.1.0"

__all__ = [
    "generate",
    "generate_super",
    "prepare_inputs",
    "build_request",
    "GenerateParams",
    "from_generation_config",
    "KNOBS",
    "Knob",
    "DecodeSession",
    "Engine",
    "EngineRequest",
    "encode_prompts",
    "IncrementalDetokenizer",
    "TextCallbackStreamer",
    "load_prompts",
    "load_model",
    "check_model_spec",
    "BUNDLED_MODELS",
    "DEFAULT_MODEL",
    "DTYPES",
    "BACKENDS",
    "LlamaCppModel",
    "LlamaCppState",
    "QuantLinear",
    "quant_kernel",
    "int8_kernel",
    "int8_kernel_problem",
    "use_gqa_attention",
    "quantize_model",
    "vocab_size",
    "context_length",
    "default_eos_pad",
    "ModelState",
    "KVState",
    "Backend",
    "backend_of",
    "register_backend",
    "left_pad",
    "prune_cache",
    "GenerationOutput",
    "RequestStats",
    "RowTracker",
    "LogitsProcessor",
    "GreedyProcessor",
    "MultinomialProcessor",
    "TopKProcessor",
    "NucleusProcessor",
    "TopKNucleusProcessor",
    "make_processor",
    "top_k_filtering",
    "top_p_filtering",
    "HistoryProcessor",
    "LogitsPipeline",
    "make_pipeline",
    "check_processor_options",
    "check_min_new_tokens",
    "PROCESSOR_OPTIONS",
    "LogitBias",
    "RepetitionPenalty",
    "PresenceFrequencyPenalty",
    "NoRepeatNGram",
    "BadWords",
    "SuppressTokens",
    "MinNewTokens",
    "Temperature",
    "TopK",
    "TopP",
    "MinP",
    "TypicalP",
    "CONSTRAINT_OPTIONS",
    "ConstraintSpec",
    "GrammarConstraint",
    "RowConstraints",
    "constraint_stats",
    "forced_tokens",
    "STRATEGIES",
    "autoregressive_generate",
    "speculative_generate",
    "Draft",
    "Drafter",
    "EagleHead",
    "EagleDrafter",
    "load_head",
    "train_drafter",
    "TrainConfig",
    "max_fn",
    "beam_search_generate",
    "format_beam_trace",
    "ExtendedInferenceSampler",
    "format_eis_trace",
    "iterative_generate",
    "decode_refine",
    "decode_jacobi",
    "format_refine_trace",
    "continuation_loglik",
    "distinct_n",
    "exact_match",
    "normalize_answer",
    "DecodeKitError",
    "INgramStorage",
    "NGramStorage",
    "OneLevelNGramStorage",
    "ngram_assisted_speculative_generate",
    "NgramDrafter",
    "PromptLookupDrafter",
    "AcceptanceGate",
    "generate_dataset",
    "RayEngine",
]

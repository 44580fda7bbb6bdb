"""Rollout: jitted batched sampling from the policy."""

from .sampler import (DEFAULT_BUCKETS, KVState, SampleOutput, SamplingConfig, bucket_length,
                      continue_generation, generate, left_pad_to)

__all__ = ["DEFAULT_BUCKETS", "KVState", "SampleOutput", "SamplingConfig", "bucket_length",
           "continue_generation", "generate", "left_pad_to"]

"""Rollout: jitted batched sampling from the policy."""

from .sampler import (DEFAULT_BUCKETS, KVState, SampleOutput, SamplingConfig, bucket_length,
                      continue_generation, generate, left_pad_to, resolve_pad_id,
                      resolve_stop_ids)

__all__ = ["DEFAULT_BUCKETS", "KVState", "SampleOutput", "SamplingConfig", "bucket_length",
           "continue_generation", "generate", "left_pad_to", "resolve_pad_id",
           "resolve_stop_ids"]

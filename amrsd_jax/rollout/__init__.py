"""Rollout: jitted batched sampling from the policy."""

from .sampler import (DEFAULT_BUCKETS, SampleOutput, SamplingConfig, bucket_length, generate,
                      left_pad_to)

__all__ = ["DEFAULT_BUCKETS", "SampleOutput", "SamplingConfig", "bucket_length", "generate",
           "left_pad_to"]
